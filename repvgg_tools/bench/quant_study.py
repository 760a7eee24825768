"""The int8 study's pieces: a deterministic shapes-and-textures dataset and per-layer quantization statistics.

Why RepVGG loses accuracy under standard int8 PTQ (Chu et al., "Make RepVGG Greater Again", AAAI 2024): the fused
3x3 kernel sums the 3x3 branch, the 1x1 branch and the identity BN, which spreads the per-output-channel weight
ranges and variances and produces activation outliers. The functions here measure exactly that on a fused (deploy)
model, layer by layer:

- :func:`sqnr_db`: signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - q)^2)`` in dB;
- :func:`quantize_weight` / :func:`quantize_activation`: symmetric int8 as :mod:`repvgg_tools.export.qdq` writes it
  (weights per output channel ``max|W| / 127`` or per tensor, activations per tensor ``threshold / 127``);
- :func:`weight_statistics`: per-layer weight SQNR (per channel and per tensor) and the spread of the per-channel
  ranges and standard deviations;
- :func:`activation_statistics`: the outlier ratio ``max|x| / percentile_99.9(|x|)`` and the activation SQNR at a
  given threshold;
- :func:`shapes_dataset`: 16 classes (8 shapes x 2 textures) at any size, seeded, with random colours, position,
  scale, rotation and background noise: hard enough that a tiny network stays well below 100% top-1.

Everything is numpy in float64; the study tool (``tools/int8_study.py``) gathers tensors and calls these.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = [
    "SHAPES", "TEXTURES", "SHAPES_CLASSES", "SHAPES_SPLITS", "sqnr_db", "quantize_weight", "quantize_activation",
    "weight_statistics", "activation_statistics", "shapes_dataset",
]

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "ellipse", "half_disc")
TEXTURES = ("solid", "striped")
SHAPES_CLASSES = len(SHAPES) * len(TEXTURES)
SHAPES_SPLITS = {"train": 0, "val": 1, "calib": 2, "test": 3}  # split -> stream of the seeded generator
OUTLIER_PERCENTILE = 99.9
SHAPES_MEAN, SHAPES_VAR = 0.29, 0.058  # pixel mean and variance before the noise (measured over 2000 images)


def sqnr_db(x: np.ndarray, q: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - q)^2)`` in dB.

    Args:
        x: the signal (any shape).
        q: its quantized (dequantized) version, same shape.

    Returns:
        The ratio in dB; ``inf`` when ``q == x`` exactly, ``-inf`` for an all-zero signal with nonzero noise,
        ``nan`` when both are zero.

    Raises:
        ValueError: shapes differ.
    """
    x, q = np.asarray(x, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if x.shape != q.shape:
        raise ValueError(f"signal and quantized shapes differ: {x.shape} vs {q.shape}")
    signal, noise = float((x * x).sum()), float(((x - q) ** 2).sum())
    if noise == 0:
        return float("inf") if signal > 0 else float("nan")
    if signal == 0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def quantize_weight(w: np.ndarray, per_channel: bool = True, qmax: int = 127) -> np.ndarray:
    """Symmetric int8 fake quantization of a weight, axis 0 = output channel (as the Q/DQ exporter does).

    Args:
        w: ``(C_out, ...)`` weight.
        per_channel: one scale ``max|W_c| / qmax`` per output channel, else one ``max|W| / qmax``.
        qmax: largest integer level.

    Returns:
        The dequantized weight, float64, same shape.
    """
    w = np.asarray(w, dtype=np.float64)
    flat = w.reshape(w.shape[0], -1)
    amax = np.abs(flat).max(1) if per_channel else np.full(w.shape[0], np.abs(flat).max())
    scale = np.where(amax > 0, amax / qmax, 1.0)[:, None]
    return (np.clip(np.rint(flat / scale), -qmax, qmax) * scale).reshape(w.shape)


def quantize_activation(x: np.ndarray, threshold: float) -> np.ndarray:
    """Per-tensor symmetric int8 fake quantization (scale ``threshold / 127``, levels -128..127, as ONNX Q/DQ).

    Raises:
        ValueError: a threshold that is not positive and finite.
    """
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"the threshold must be positive and finite, not {threshold}")
    scale = threshold / 127.0
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) / scale), -128, 127) * scale


def weight_statistics(w: np.ndarray) -> dict[str, float]:
    """Quantization-relevant statistics of one fused weight ``(C_out, ...)``.

    Returns:
        ``sqnr_per_channel`` and ``sqnr_per_tensor`` (dB, int8 symmetric), ``range_spread`` (largest over smallest
        per-channel max|W|), ``std_spread`` (the same for the per-channel standard deviation), ``max_over_std``
        (max|W| over the std of all weights: how far the largest weight sits in the tail), ``max_abs``.
    """
    w = np.asarray(w, dtype=np.float64)
    flat = w.reshape(w.shape[0], -1)
    amax, std = np.abs(flat).max(1), flat.std(1)

    def spread(v: np.ndarray) -> float:
        return float(v.max() / v.min()) if v.min() > 0 else float("inf")

    total_std = float(flat.std())
    return {
        "sqnr_per_channel": sqnr_db(w, quantize_weight(w, per_channel=True)),
        "sqnr_per_tensor": sqnr_db(w, quantize_weight(w, per_channel=False)),
        "range_spread": spread(amax),
        "std_spread": spread(std),
        "max_over_std": float(amax.max() / total_std) if total_std > 0 else float("inf"),
        "max_abs": float(amax.max()),
    }


def activation_statistics(x: np.ndarray, thresholds: Mapping[str, float] | None = None) -> dict[str, float]:
    """Outlier and quantization statistics of one activation tensor (all images of a batch together).

    Args:
        x: the activation, any shape.
        thresholds: ``{name: threshold}`` (e.g. one per calibration method); each gives ``sqnr_<name>``.

    Returns:
        ``max_abs``, ``p999`` (99.9th percentile of |x|), ``outlier_ratio`` (``max_abs / p999``; inf when p999 is
        0 and max is not), and ``sqnr_<name>`` in dB for every threshold.
    """
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x).ravel()
    max_abs = float(a.max()) if a.size else 0.0
    p999 = float(np.percentile(a, OUTLIER_PERCENTILE)) if a.size else 0.0
    ratio = max_abs / p999 if p999 > 0 else (1.0 if max_abs == 0 else float("inf"))
    out = {"max_abs": max_abs, "p999": p999, "outlier_ratio": ratio}
    for name, t in (thresholds or {}).items():
        out[f"sqnr_{name}"] = sqnr_db(x, quantize_activation(x, t))
    return out


def _shape_masks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``(len(SHAPES), ...)`` boolean masks of every shape in unit coordinates (radius about 1)."""
    r2 = u * u + v * v
    return np.stack([
        r2 < 1.0,                                                          # circle
        np.maximum(np.abs(u), np.abs(v)) < 0.8,                            # square
        (v > -0.5) & (v < 1.0 - np.sqrt(3.0) * np.abs(u)),                 # triangle
        ((np.abs(u) < 0.3) & (np.abs(v) < 1.0)) | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0)),  # cross
        (r2 < 1.0) & (r2 > 0.4),                                           # ring
        np.abs(u) + np.abs(v) < 1.0,                                       # diamond
        (u * u + 4.0 * v * v) < 1.0,                                       # ellipse
        (r2 < 1.0) & (v > 0.0),                                            # half disc
    ])


def shapes_dataset(split: str = "train", count: int = 2000, image_size: int = 32, seed: int = 0,
                   noise: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic synthetic classification set: 8 shapes x 2 textures (solid, striped) = 16 classes.

    Each image has a random dark background colour, a random bright foreground colour (the stripes a second,
    any colour), a random
    position, size (radius 18-40% of the side) and rotation, and Gaussian pixel noise; classes are balanced up to
    rounding. The splits draw from independent streams of one seeded generator, so they never share an image and a
    split does not change when another split's ``count`` does.

    Args:
        split: ``train``, ``val``, ``calib`` or ``test``.
        count: images.
        image_size: side length (>= 8).
        seed: the generator seed; the same seed and arguments give identical arrays.
        noise: standard deviation of the pixel noise (pixels are in [0, 1] before it).

    Returns:
        ``(images, labels)``: ``(count, 3, image_size, image_size)`` float32 standardized to zero mean and unit
        variance per channel (fixed constants, the same for every split), and ``(count,)`` int64 labels
        ``shape * 2 + texture``.

    Raises:
        ValueError: an unknown split, ``count < 1`` or ``image_size < 8``.
    """
    if split not in SHAPES_SPLITS:
        raise ValueError(f"split must be one of {', '.join(SHAPES_SPLITS)}, not {split!r}")
    if count < 1 or image_size < 8:
        raise ValueError(f"count must be >= 1 and image_size >= 8, not {count} and {image_size}")
    rng = np.random.default_rng([seed, SHAPES_SPLITS[split]])
    labels = rng.permutation(np.arange(count) % SHAPES_CLASSES).astype(np.int64)
    shape, texture = labels // len(TEXTURES), labels % len(TEXTURES)
    n = count
    centre = rng.uniform(-0.3, 0.3, size=(n, 2))
    radius = rng.uniform(0.36, 0.8, size=n)  # grid units: 18-40% of the side
    angle = rng.uniform(0, 2 * np.pi, size=n)
    stripe_period = rng.uniform(0.35, 0.6, size=n)  # in unit (radius) coordinates
    stripe_angle = rng.uniform(0, np.pi, size=n)
    background = rng.uniform(0.0, 0.4, size=(n, 3))  # dark background, bright shape: always visible
    foreground, second = rng.uniform(0.6, 1.0, size=(n, 3)), rng.uniform(0.0, 1.0, size=(n, 3))
    grid = (np.arange(image_size) + 0.5) / image_size * 2 - 1  # [-1, 1]
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    dx = (xx[None] - centre[:, 0, None, None]) / radius[:, None, None]
    dy = (yy[None] - centre[:, 1, None, None]) / radius[:, None, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy
    masks = _shape_masks(u, v)  # (shapes, n, H, W)
    mask = masks[shape, np.arange(n)]
    sc, ss = np.cos(stripe_angle)[:, None, None], np.sin(stripe_angle)[:, None, None]
    stripes = (np.floor((sc * u + ss * v) / stripe_period[:, None, None]) % 2 == 1) & (texture[:, None, None] == 1)
    fg = np.where(stripes[:, None], second[:, :, None, None], foreground[:, :, None, None])
    images = np.where(mask[:, None], fg, background[:, :, None, None])
    images = images + rng.normal(0.0, noise, size=images.shape)
    images = (images - SHAPES_MEAN) / np.sqrt(SHAPES_VAR + noise * noise)
    return images.astype(np.float32), labels
