"""Calibration sources for int8: calibration images and held-out check images of one distribution, never shared;
and the image loading they use (the bundled digits set, or an image folder preprocessed like ImageNet evaluation).

The int8 check (:mod:`repvgg_tools.export.int8`) runs on the held-out half, so a source splits deterministically
and refuses overlap. The digits set is the default source only for models shaped like our digits demo
(:func:`is_digits_model`); every other model names its source.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .precision import PrecisionError

__all__ = ["MIN_HELD_OUT", "CalibrationSource", "is_digits_model", "IMAGE_EXTENSIONS", "IMAGENET_MEAN",
           "IMAGENET_STD", "calibration_images", "digits_images", "folder_images", "image_files", "load_images"]

log = logging.getLogger(__name__)

MIN_HELD_OUT = 64  # fewer, and a correct model fails the 0.95 top-1 floor by chance too often (int8 module doc)
DIGITS_CLASSES = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_IMAGE_PIXELS = 50_000_000  # declared width x height above this is refused before decoding (real photos: < 50 MP)


def _digests(images: np.ndarray) -> list[bytes]:
    return [hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest() for img in images]


@dataclass(frozen=True)
class CalibrationSource:
    """Calibration images and held-out verification images from one distribution; the two never share an image.

    Build one with :meth:`digits`, :meth:`folder`, :meth:`noise` (synthetic) or :meth:`from_arrays`.

    Attributes:
        name: what the images are (``digits``, a directory, ``synthetic``).
        calibration: ``(N, C, H, W)`` float32, preprocessed like the model's inputs.
        held_out: ``(M, C, H, W)`` float32 images for the check.
        held_out_labels: class labels of ``held_out`` when known (accuracy is then reported).
        synthetic: random images: the check then says nothing about accuracy on real data.
    """

    name: str
    calibration: np.ndarray
    held_out: np.ndarray
    held_out_labels: np.ndarray | None = None
    synthetic: bool = False

    def __post_init__(self) -> None:
        for what, arr in (("calibration", self.calibration), ("held-out", self.held_out)):
            if arr.ndim != 4:
                raise PrecisionError(f"{what} images must be (N, C, H, W), not {tuple(arr.shape)}")
        if len(self.calibration) == 0:
            raise PrecisionError("no calibration images")
        if len(self.held_out) and self.calibration.shape[1:] != self.held_out.shape[1:]:
            raise PrecisionError(f"calibration images are {tuple(self.calibration.shape[1:])}, held-out images "
                                 f"{tuple(self.held_out.shape[1:])}")
        if self.held_out_labels is not None and len(self.held_out_labels) != len(self.held_out):
            raise PrecisionError("held-out labels and images differ in count")
        if set(_digests(self.calibration)) & set(_digests(self.held_out)):
            raise PrecisionError("held-out images overlap the calibration images")

    @classmethod
    def from_arrays(cls, name: str, calibration: np.ndarray, held_out: np.ndarray,
                    held_out_labels: np.ndarray | None = None, *, synthetic: bool = False,
                    min_held_out: int = MIN_HELD_OUT) -> CalibrationSource:
        """A source from arrays; held-out images equal to a calibration image are dropped first.

        Raises:
            PrecisionError: fewer than ``min_held_out`` held-out images remain, or bad shapes.
        """
        calibration = np.ascontiguousarray(calibration, dtype=np.float32)
        held_out = np.ascontiguousarray(held_out, dtype=np.float32)
        seen = set(_digests(calibration))
        keep = np.array([d not in seen for d in _digests(held_out)], dtype=bool)
        if not keep.all():
            log.warning("%s: %d held-out images equal a calibration image and are not used", name, (~keep).sum())
            held_out = held_out[keep]
            held_out_labels = None if held_out_labels is None else np.asarray(held_out_labels)[keep]
        if len(held_out) < min_held_out:
            raise PrecisionError(f"{name}: only {len(held_out)} held-out images for the int8 check, at least "
                                 f"{min_held_out} needed (images not used for calibration): add images, lower "
                                 "--calib-samples or raise --verify-samples")
        return cls(name, calibration, held_out, held_out_labels, synthetic)

    @classmethod
    def digits(cls, input_size: int, channels: int = 3, calib_samples: int = 64, verify_samples: int = 128,
               min_held_out: int = MIN_HELD_OUT) -> CalibrationSource:
        """The bundled digits set: calibration from its training split, held-out images from its validation split.

        Raises:
            PrecisionError: not a 1- or 3-channel model, or more images asked than the splits hold.
        """
        if channels not in (1, 3):
            raise PrecisionError(f"the digits set needs a 1- or 3-channel model, not {channels} channels")
        _check_counts(calib_samples, verify_samples)
        calib = digits_images("train", input_size, channels)[0]
        if calib_samples > len(calib):
            raise PrecisionError(f"the digits training split has {len(calib)} images, not {calib_samples}")
        held, labels = digits_images("val", input_size, channels, verify_samples)
        return cls.from_arrays("digits", calib[:calib_samples], held, labels, min_held_out=min_held_out)

    @classmethod
    def folder(cls, root: str | os.PathLike, input_size: int, channels: int = 3, calib_samples: int = 64,
               verify_samples: int = 128, seed: int = 0, min_held_out: int = MIN_HELD_OUT) -> CalibrationSource:
        """Images under ``root``, shuffled with ``seed`` (an ImageFolder tree lists one class after another) and
        split by file: the first ``calib_samples`` calibrate, the next ``verify_samples`` are held out.

        Raises:
            PrecisionError: no such directory, no or unreadable images, or too few images left for the check.
        """
        _check_counts(calib_samples, verify_samples)
        files = image_files(root)
        order = np.random.default_rng(seed).permutation(len(files))
        calib_files = [files[i] for i in order[:calib_samples]]
        held_files = [files[i] for i in order[calib_samples:calib_samples + verify_samples]]
        if len(held_files) < min_held_out:
            raise PrecisionError(f"{root}: {len(files)} images; {len(calib_files)} for calibration leave "
                                 f"{len(held_files)} for the int8 check, at least {min_held_out} needed: add images "
                                 f"or lower --calib-samples")
        return cls.from_arrays(str(root), load_images(calib_files, input_size, channels),
                               load_images(held_files, input_size, channels), min_held_out=min_held_out)

    @classmethod
    def noise(cls, input_size: int, channels: int = 3, calib_samples: int = 64, verify_samples: int = 128,
              seed: int = 0) -> CalibrationSource:
        """Standard-normal random images, for smoke tests only: the check then says nothing about accuracy."""
        _check_counts(calib_samples, verify_samples)
        rng = np.random.default_rng(seed)
        shape = (calib_samples + verify_samples, channels, input_size, input_size)
        images = rng.standard_normal(shape, dtype=np.float32)
        return cls.from_arrays("synthetic", images[:calib_samples], images[calib_samples:], synthetic=True,
                               min_held_out=0)


def _check_counts(calib_samples: int, verify_samples: int) -> None:
    if calib_samples < 1 or verify_samples < 1:
        raise PrecisionError(f"--calib-samples and --verify-samples must be >= 1, not {calib_samples} and "
                             f"{verify_samples}")


def is_digits_model(model: Any, input_size: int = 32) -> bool:
    """Whether a PyTorch model has the shape of our digits demo models, for which the digits set is the default
    calibration source: a classifier (one ``(N, 10)`` output) whose first convolution takes 1 or 3 channels.

    This is a guess from shapes: a CIFAR-10 model has the same shape. Its only use is to choose a default; any
    other model needs an explicit calibration source.
    """
    import torch
    from torch import nn

    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or conv.in_channels not in (1, 3):
        return False
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, conv.in_channels, input_size, input_size))
    return isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == DIGITS_CLASSES


def digits_images(split: str, input_size: int, channels: int = 3, samples: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` from the built-in digits set, upsampled to ``input_size`` (see ``digits_dataset``)."""
    from ..data import digits_dataset

    images, labels = digits_dataset(split, image_size=input_size, channels=channels).tensors
    if samples is not None:
        images, labels = images[:samples], labels[:samples]
    return images.numpy(), labels.numpy()


def image_files(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (any depth, e.g. an ImageFolder tree), in sorted path order.

    Raises:
        PrecisionError: not a directory, or no images in it.
    """
    root = Path(root)
    if not root.is_dir():
        raise PrecisionError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise PrecisionError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return files


def load_images(files: Sequence[str | os.PathLike], input_size: int, channels: int = 3) -> np.ndarray:
    """Images preprocessed like ImageNet evaluation, ``(len(files), channels, input_size, input_size)`` float32.

    Each image is resized (shorter side to ``input_size / 0.875``), centre-cropped to ``input_size`` and normalized
    with the ImageNet mean/std (their channel averages for 1 channel).

    Raises:
        PrecisionError: an unreadable image, or a model with other than 1 or 3 channels.
    """
    import torch
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import v2

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    elif channels != 3:
        raise PrecisionError(f"calibration images need a 1- or 3-channel model, not {channels} channels")
    transform = v2.Compose([
        v2.ToImage(), v2.Resize(round(input_size / 0.875), antialias=True), v2.CenterCrop(input_size),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std),
    ])
    out = np.empty((len(files), channels, input_size, input_size), dtype=np.float32)
    for i, path in enumerate(files):
        try:
            with warnings.catch_warnings():  # PIL's DecompressionBombWarning: the size check below says it in one line
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    width, height = img.size  # from the header: nothing is decoded yet
                    if width * height > MAX_IMAGE_PIXELS:
                        raise PrecisionError(f"{path}: declares {width}x{height} pixels, more than "
                                             f"{MAX_IMAGE_PIXELS // 10**6} megapixels; not decoded (damaged or "
                                             "hostile file?)")
                    img = img.convert("RGB" if channels == 3 else "L")
                    out[i] = transform(img).numpy()
        except PrecisionError:
            raise
        except Image.DecompressionBombError:
            raise PrecisionError(f"{path}: declares more than {MAX_IMAGE_PIXELS // 10**6} megapixels; not decoded "
                                 "(damaged or hostile file?)") from None
        except UnidentifiedImageError:
            raise PrecisionError(f"{path}: not a readable image (unknown format)") from None
        except Exception as exc:  # noqa: BLE001 - a damaged file raises OSError, SyntaxError, struct.error, ...
            raise PrecisionError(f"{path}: not a readable image ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})") from None
    return out


def folder_images(root: str | os.PathLike, input_size: int, samples: int | None = None, channels: int = 3
                  ) -> np.ndarray:
    """The first ``samples`` images under ``root`` in sorted path order (:func:`image_files`), preprocessed by
    :func:`load_images`.

    Raises:
        PrecisionError: not a directory, no images in it, or an unreadable image.
    """
    files = image_files(root)
    return load_images(files[:samples] if samples is not None else files, input_size, channels)


def calibration_images(source: str, input_size: int, samples: int, channels: int = 3) -> np.ndarray:
    """Calibration batch: ``"digits"`` (training split of the built-in set) or an image directory path."""
    if samples < 1:
        raise PrecisionError(f"--calib-samples must be at least 1, not {samples}")
    if source == "digits":
        if channels not in (1, 3):
            raise PrecisionError(f"the digits set needs a 1- or 3-channel model, not {channels} channels")
        return digits_images("train", input_size, channels, samples)[0]
    return folder_images(source, input_size, samples, channels)
