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
    "fuse_branches_bn",
    "fuse_qa_branches",
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
            ``running_var``, ``eps``, ``bn_weight``, ``bn_bias`` of :func:`fuse_conv_bn`, or ``None`` for a branch
            without BatchNorm (a plain conv, e.g. QARepVGG's 1x1, or a bare identity).
        dtype: result dtype; defaults to the first kernel's.

    Returns:
        ``(kernel, bias)``: ``(C_out, C_in/groups, kh_max, kw_max)`` and ``(C_out,)``.
    """
    if not branches:
        raise ValueError("fuse_branches needs at least one branch")
    size = (max(b[0].shape[-2] for b in branches), max(b[0].shape[-1] for b in branches))
    fused = [_fold_branch(kernel, conv_bias, bn) for kernel, conv_bias, bn in branches]
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


def _fold_branch(kernel: Tensor, conv_bias: Tensor | None, bn: Mapping[str, Any] | None) -> tuple[Tensor, Tensor]:
    """One branch as a fresh float64 ``(kernel, bias)`` (fresh: :func:`fuse_branches` adds into it in place)."""
    if bn is not None:
        return fuse_conv_bn(kernel, conv_bias, dtype=torch.float64, **bn)
    fused = kernel.to(torch.float64, copy=True)
    bias = fused.new_zeros(fused.shape[0]) if conv_bias is None else conv_bias.to(torch.float64, copy=True)
    return fused, bias


def fuse_branches_bn(
    branches: Sequence[tuple[Tensor, Tensor | None, Mapping[str, Any] | None]],
    post_bn: Mapping[str, Any],
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Equivalent single conv of ``BN_post(sum of branches)``: a BatchNorm after the branch sum (QARepVGG).

    With the post-sum BatchNorm as ``y -> t * y + (beta - mean * t)``, ``t = g / sqrt(var + eps)``, the sum
    ``(K, b)`` of the branches becomes ``K' = K * t`` and ``b' = beta + (b - mean) * t``. ``t`` is folded into each
    branch's own BatchNorm (or, for a branch without one, applied as its scale) before :func:`fuse_branches` sums
    them, so the large kernels are read once and rounded once, as for a RepVGG block. Differentiable.

    Exact when the post-sum BatchNorm is in inference mode (running statistics) and nothing non-linear sits between
    the sum and it (an SE placed before the post-sum BN cannot be folded); the branches obey the conditions of
    :func:`fuse_branches` (shared stride, dilation and groups; smaller kernels padded ``p - d * (k // 2)``).

    Args:
        branches: as for :func:`fuse_branches` (``bn`` may be ``None`` for a branch without BatchNorm).
        post_bn: the post-sum BatchNorm over ``C_out`` channels, keyword arguments ``running_mean``,
            ``running_var``, ``eps``, ``bn_weight``, ``bn_bias`` of :func:`fuse_conv_bn`.
        dtype: result dtype; defaults to the first kernel's.

    Returns:
        ``(kernel, bias)``: ``(C_out, C_in/groups, kh_max, kw_max)`` and ``(C_out,)``.

    Raises:
        ValueError: no branches, shapes that do not fit, or corrupt BatchNorm statistics.
    """
    if not branches:
        raise ValueError("fuse_branches_bn needs at least one branch")
    if branches[0][0].shape[0] != post_bn["running_mean"].shape[0]:
        raise ValueError(
            f"the post-sum BatchNorm has {post_bn['running_mean'].shape[0]} channels but the branches have "
            f"{branches[0][0].shape[0]} outputs"
        )
    scale, shift = fuse_bn(
        post_bn["running_mean"], post_bn["running_var"], post_bn["eps"], post_bn.get("bn_weight"),
        post_bn.get("bn_bias"),
    )
    scaled = [(kernel, conv_bias, _scaled_bn(bn, scale)) for kernel, conv_bias, bn in branches]
    kernel, bias = fuse_branches(scaled, torch.float64)
    dtype = dtype or branches[0][0].dtype
    return kernel.to(dtype), (bias + shift).to(dtype)


def _scaled_bn(bn: Mapping[str, Any] | None, scale: Tensor) -> dict[str, Any]:
    """BatchNorm keyword arguments of ``scale * bn(y)``; for ``bn=None`` those of ``scale * y`` (mean 0, var 1)."""
    if bn is None:
        ones = torch.ones_like(scale)
        return {"running_mean": torch.zeros_like(scale), "running_var": ones, "eps": 0.0, "bn_weight": scale,
                "bn_bias": None}
    gamma, beta = bn.get("bn_weight"), bn.get("bn_bias")
    return {**bn, "bn_weight": scale if gamma is None else _f64(gamma) * scale,
            "bn_bias": None if beta is None else _f64(beta) * scale}


def fuse_qa_branches(
    kernel_3x3: Tensor,
    bn_3x3: Mapping[str, Any],
    kernel_1x1: Tensor | None,
    identity_groups: int | None,
    post_bn: Mapping[str, Any],
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Equivalent 3x3 conv of a QARepVGG block: ``BN_post(BN_3(conv3x3(x)) + conv1x1(x) + x)``.

    ``K' = (W3 * g3 / s3 + pad(W1) + I) * g / s`` and ``b' = beta + (b3 - mean) * g / s``, where ``b3`` is the
    folded 3x3 branch's bias and ``g, s, beta, mean`` belong to the post-sum BatchNorm (see
    :func:`fuse_branches_bn` for the exactness conditions). Float64 inside, rounded once; differentiable.

    Args:
        kernel_3x3: ``(C_out, C_in/groups, 3, 3)`` weight of the 3x3 conv (no bias).
        bn_3x3: its BatchNorm, keyword arguments of :func:`fuse_conv_bn` (``running_mean``, ``running_var``,
            ``eps``, ``bn_weight``, ``bn_bias``).
        kernel_1x1: ``(C_out, C_in/groups, 1, 1)`` weight of the 1x1 conv (no BatchNorm, no bias), or ``None``.
        identity_groups: the block's groups when it has the identity branch (``C_in == C_out``, stride 1), else
            ``None``.
        post_bn: the BatchNorm after the sum, keyword arguments of :func:`fuse_conv_bn`.
        dtype: result dtype; defaults to ``kernel_3x3``'s.

    Returns:
        ``(kernel, bias)``: ``(C_out, C_in/groups, 3, 3)`` and ``(C_out,)``.

    Raises:
        ValueError: an identity branch with ``C_in != C_out``, shapes that do not fit, or corrupt statistics.
    """
    branches: list[tuple[Tensor, Tensor | None, Mapping[str, Any] | None]] = [(kernel_3x3, None, bn_3x3)]
    if kernel_1x1 is not None:
        branches.append((kernel_1x1, None, None))
    if identity_groups is not None:
        channels = kernel_3x3.shape[0]
        if kernel_3x3.shape[1] * identity_groups != channels:
            raise ValueError(
                f"an identity branch needs C_in == C_out; the 3x3 kernel {tuple(kernel_3x3.shape)} with "
                f"groups={identity_groups} has C_in={kernel_3x3.shape[1] * identity_groups}, C_out={channels}"
            )
        # a 1x1 one-hot kernel lands on the centre tap (exactly 1 in float64)
        branches.append((identity_kernel(channels, 1, identity_groups, torch.float64, kernel_3x3.device), None, None))
    return fuse_branches_bn(branches, post_bn, dtype or kernel_3x3.dtype)
