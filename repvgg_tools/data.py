"""Datasets: scikit-learn's digits (built in, no download) and ImageFolder train/val directories for training.

The digits set (1797 8x8 grey images, 10 classes, upsampled) ships inside scikit-learn, so the quickstart, int8
calibration and tests never download anything. ImageFolder transforms come from timm's ``create_transform``
(random-resized crop, flip, AutoAugment) or the VGG paper's scale jitter (shorter side S in [min, max], then crop).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["digits_dataset", "DIGITS_CLASSES", "image_folder", "train_transform", "eval_transform"]

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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int = 224, crop: str = "rrc", scale: tuple[float, float] = (0.08, 1.0),
                    scale_jitter: tuple[int, int] = (256, 512), hflip: float = 0.5, color_jitter: float = 0.0,
                    auto_augment: str | None = None):
    """Training transform of a PIL image to a normalized tensor.

    Args:
        image_size: output side.
        crop: ``"rrc"`` (random-resized crop, via ``timm.data.create_transform``), ``"scale_jitter"`` (the VGG
            paper: resize the shorter side to S drawn uniformly from ``scale_jitter``, random ``image_size`` crop),
            or ``"none"`` (resize and centre crop, no augmentation).
        scale: area range of the random-resized crop.
        hflip: horizontal flip probability.
        color_jitter: brightness/contrast/saturation jitter (0 = off).
        auto_augment: timm policy string such as ``"original"`` (ImageNet AutoAugment) or None.
    """
    from timm.data import create_transform

    if crop == "none":
        return eval_transform(image_size, image_size)
    if crop == "rrc":
        return create_transform(
            image_size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=color_jitter or None,
            auto_augment=auto_augment, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
    if crop != "scale_jitter":
        raise ValueError(f"crop must be 'rrc', 'scale_jitter' or 'none', not {crop!r}")
    from torchvision.transforms import v2

    lo, hi = int(scale_jitter[0]), int(scale_jitter[1])
    if lo < image_size:
        raise ValueError(f"scale jitter minimum {lo} is smaller than the crop {image_size}")
    steps = [v2.RandomShortestSize(min_size=list(range(lo, hi + 1)), antialias=True), v2.RandomCrop(image_size)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if color_jitter:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    if auto_augment:
        from timm.data.auto_augment import auto_augment_transform

        steps.append(auto_augment_transform(auto_augment, {"translate_const": int(image_size * 0.45),
                                                           "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)}))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def eval_transform(image_size: int = 224, resize: int = 256):
    """Evaluation transform: resize the shorter side to ``resize``, centre crop ``image_size``, normalize."""
    from timm.data import create_transform

    return create_transform(image_size, is_training=False, crop_pct=image_size / resize, interpolation="bilinear",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def image_folder(root: str, transform) -> Dataset:
    """A torchvision ``ImageFolder`` (one sub-directory per class) with ``transform``.

    Raises:
        ValueError: ``root`` is not a directory or holds no images.
    """
    from pathlib import Path

    from torchvision.datasets import ImageFolder

    if not root or not Path(root).is_dir():
        raise ValueError(f"{root}: not a directory (expected one sub-directory of images per class)")
    try:
        return ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"{root}: {exc}") from None
