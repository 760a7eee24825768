"""Built-in data: scikit-learn's digits (1797 8x8 grey images, 10 classes), upsampled, as a tiny image set.

It ships inside scikit-learn, so the quickstart, int8 calibration and tests never download anything.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

__all__ = ["digits_dataset", "DIGITS_CLASSES"]

DIGITS_CLASSES = 10


def digits_dataset(split: str = "train", image_size: int = 32, channels: int = 3, val_fraction: float = 0.2,
                   seed: int = 0) -> TensorDataset:
    """The digits set as ``(images, labels)`` tensors: images ``(N, channels, image_size, image_size)`` float32.

    Pixels (0-16) are scaled to [0, 1], standardized with the training split's mean/std, and bilinearly upsampled.
    The split is stratified and deterministic for a given ``seed``.

    Args:
        split: ``"train"``, ``"val"`` or ``"all"``.
        image_size: output side length.
        channels: 1, or 3 (grey replicated) for ImageNet-style models.
        val_fraction: share of each class held out for ``"val"``.
        seed: split seed.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(DIGITS_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        val_mask[idx[: round(len(idx) * val_fraction)]] = True
    mean, std = images[~val_mask].mean(), images[~val_mask].std()
    images = (images - mean) / std
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    images = images.expand(-1, channels, -1, -1).contiguous()
    keep = {"train": ~val_mask, "val": val_mask, "all": torch.ones_like(val_mask)}[split]
    return TensorDataset(images[keep], labels[keep])
