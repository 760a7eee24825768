"""Pure tensor math of structural re-parameterization.

Every function here takes tensors and returns tensors: no modules, no state. Arithmetic runs in float64 and
results come back in the dtype and on the device of the weights they were derived from, so a fused fp16 kernel
is rounded once, at the end, instead of at every step.

Shapes follow ``torch.nn.Conv2d``: a kernel is ``(C_out, C_in/groups, kh, kw)`` and a bias is ``(C_out,)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "fuse_conv_bn",
    "fuse_bn",
    "pad_kernel",
    "identity_kernel",
    "merge_branches",
    "fuse_branches",
]


def _f64(t: Tensor) -> Tensor:
    # Differentiable: the paper's custom L2 penalizes the fused kernel, so gradients must flow through here.
    return t.to(torch.float64)


def fuse_bn(
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Express an inference-mode BatchNorm as a per-channel affine map ``y = scale * x + shift``.

    Args:
        running_mean, running_var: ``(C,)`` running statistics.
        eps: the BatchNorm epsilon.
        weight, bias: ``(C,)`` affine parameters (gamma, beta); ``None`` for a non-affine BatchNorm.

    Returns:
        ``(scale, shift)``, both ``(C,)`` in float64.

    Raises:
        ValueError: when ``running_var + eps`` is not positive (a corrupt or uninitialized BatchNorm).
    """
    var = _f64(running_var) + eps
    if var.device.type != "meta" and not bool(torch.all(var > 0)):  # meta tensors (shape-only models) hold no values
        raise ValueError("BatchNorm running_var + eps must be positive; the statistics are corrupt")
    inv_std = torch.rsqrt(var)
    gamma = _f64(weight) if weight is not None else torch.ones_like(inv_std)
    beta = _f64(bias) if bias is not None else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    shift = beta - _f64(running_mean) * scale
    return scale, shift


def fuse_conv_bn(
    kernel: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold an inference-mode BatchNorm into the convolution that feeds it.

    ``W' = W * gamma / sqrt(var + eps)`` per output channel and ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``.

    Args:
        kernel: ``(C_out, C_in/groups, kh, kw)`` convolution weight.
        conv_bias: ``(C_out,)`` or ``None`` when the convolution has no bias.
        running_mean, running_var, eps, bn_weight, bn_bias: the BatchNorm over ``C_out`` channels
            (``bn_weight``/``bn_bias`` are ``None`` for a non-affine BatchNorm).
        dtype: result dtype; defaults to the kernel's. Pass ``torch.float64`` to keep intermediate branches
            exact before :func:`merge_branches` rounds once.

    Returns:
        ``(kernel, bias)`` of the fused convolution: ``(C_out, C_in/groups, kh, kw)`` and ``(C_out,)``, on the
        kernel's device.
    """
    if kernel.shape[0] != running_mean.shape[0]:
        raise ValueError(
            f"BatchNorm has {running_mean.shape[0]} channels but the convolution has {kernel.shape[0]} outputs"
        )
    scale, shift = fuse_bn(running_mean, running_var, eps, bn_weight, bn_bias)
    # type promotion computes in float64 (``scale`` is float64) without a float64 copy of the kernel first
    fused_kernel = kernel * scale.reshape(-1, 1, 1, 1)
    fused_bias = shift if conv_bias is None else shift + _f64(conv_bias) * scale
    dtype = dtype or kernel.dtype
    return fused_kernel.to(dtype), fused_bias.to(dtype)


def pad_kernel(kernel: Tensor, size: int | Sequence[int]) -> Tensor:
    """Zero-pad a smaller odd kernel to ``size`` around the centre (a 1x1 becomes the centre tap of a 3x3).

    Exact for any stride and dilation when the small convolution used padding ``p - d * (k // 2)``.

    Args:
        kernel: ``(C_out, C_in/groups, kh, kw)`` with odd ``kh <= size[0]`` and ``kw <= size[1]``.
        size: target spatial size ``k`` or ``(kh, kw)``.

    Returns:
        ``(C_out, C_in/groups, size[0], size[1])``, same dtype and device.

    Raises:
        ValueError: the kernel is larger than ``size`` or a size is even (no centre tap).
    """
    ph, pw = _centre_offset(kernel.shape[-2:], (size, size) if isinstance(size, int) else tuple(size))
    return torch.nn.functional.pad(kernel, [pw, pw, ph, ph])


def _centre_offset(small: Sequence[int], size: Sequence[int]) -> tuple[int, int]:
    """Row and column offset that centres a ``small`` odd kernel inside an odd kernel of ``size``."""
    (kh, kw), (th, tw) = small, size
    if kh > th or kw > tw or not all(n % 2 for n in (kh, kw, th, tw)):
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in a {th}x{tw} kernel (both need odd sizes)")
    return (th - kh) // 2, (tw - kw) // 2


def identity_kernel(
    channels: int,
    kernel_size: int | Sequence[int] = 3,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """One-hot kernel of a convolution that copies its input: ``K[i, i % (C/groups), kh//2, kw//2] = 1``.

    Args:
        channels: ``C``, input and output channels.
        kernel_size: ``k`` or ``(kh, kw)``, odd.
        groups: convolution groups; must divide ``channels``.

    Returns:
        ``(C, C/groups, kh, kw)`` in ``dtype`` on ``device``.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if channels % groups:
        raise ValueError(f"groups={groups} does not divide channels={channels}")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError("identity kernels need odd kernel sizes")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kh, kw, dtype=dtype, device=device)
    rows = torch.arange(channels, device=device)
    kernel[rows, rows % per_group, kh // 2, kw // 2] = 1
    return kernel


def merge_branches(
    kernels: Sequence[Tensor], biases: Sequence[Tensor], dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Sum parallel branches that share input, output, stride, dilation and groups.

    Args:
        kernels: ``(C_out, C_in/groups, k, k)`` each, already padded to a common size.
        biases: ``(C_out,)`` each.
        dtype: result dtype; defaults to the first kernel's.

    Returns:
        ``(kernel, bias)`` summed in float64 and cast once to ``dtype``.
    """
    if not kernels or len(kernels) != len(biases):
        raise ValueError("merge_branches needs one bias per kernel and at least one branch")
    dtype = dtype or kernels[0].dtype
    return _sum_f64(kernels).to(dtype), _sum_f64(biases).to(dtype)


def _sum_f64(tensors: Sequence[Tensor]) -> Tensor:
    # one fresh float64 accumulator, added into in place: large kernels are not copied once per branch
    total = _f64(tensors[0]) + _f64(tensors[1]) if len(tensors) > 1 else _f64(tensors[0]).clone()
    for t in tensors[2:]:
        total.add_(_f64(t))
    return total


def fuse_branches(
    branches: Sequence[tuple[Tensor, Tensor | None, Mapping[str, Any]]], dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """Equivalent single conv of a sum of parallel ``BN(conv(x))`` branches (a RepVGG block's training form).

    An identity branch is passed as ``(identity_kernel(C, 1, groups), None, bn)``: a 1x1 one-hot kernel, which
    lands on the centre tap like the kxk one-hot kernel but costs a ninth of the work. Each branch is folded in
    float64 and added onto the centre of the largest kernel in place (no padded copies: a repvgg_b3 checkpoint
    converts in about half the time); the result is rounded once. Differentiable.

    Args:
        branches: ``(kernel, conv_bias, bn)`` each, with ``kernel`` ``(C_out, C_in/groups, kh, kw)`` (odd sizes),
            ``conv_bias`` ``(C_out,)`` or ``None``, and ``bn`` the keyword arguments ``running_mean``,
            ``running_var``, ``eps``, ``bn_weight``, ``bn_bias`` of :func:`fuse_conv_bn`.
        dtype: result dtype; defaults to the first kernel's.

    Returns:
        ``(kernel, bias)``: ``(C_out, C_in/groups, kh_max, kw_max)`` and ``(C_out,)``.
    """
    if not branches:
        raise ValueError("fuse_branches needs at least one branch")
    size = (max(b[0].shape[-2] for b in branches), max(b[0].shape[-1] for b in branches))
    fused = [fuse_conv_bn(kernel, conv_bias, dtype=torch.float64, **bn) for kernel, conv_bias, bn in branches]
    # accumulate into a full-size fused kernel: it is a fresh float64 tensor, owned here
    main = next((i for i, (k, _) in enumerate(fused) if tuple(k.shape[-2:]) == size), None)
    if main is None:
        kernel = fused[0][0].new_zeros(*fused[0][0].shape[:2], *size)
        bias = torch.zeros_like(fused[0][1])
    else:
        kernel, bias = fused[main]
    for i, (k, b) in enumerate(fused):
        if i == main:
            continue
        (kh, kw), (ph, pw) = k.shape[-2:], _centre_offset(k.shape[-2:], size)
        kernel[..., ph:ph + kh, pw:pw + kw] += k
        bias = bias + b
    dtype = dtype or branches[0][0].dtype
    return kernel.to(dtype), bias.to(dtype)
