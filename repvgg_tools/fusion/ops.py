"""Linear algebra of whole re-parameterization sub-graphs: pure tensor functions, float64 inside.

:mod:`repvgg_tools.fusion.core` holds the RepVGG core (BN fold, centre padding, identity kernels, branch sums); this
module adds what the rest of the family needs and the graph fuser composes: BN before a conv or linear, BN after a sum,
BN-only branches, average pooling as a conv, regrouping and dilating kernels, sequential composition of two
convolutions (DBB's 1x1->kxk, conv->avgpool), sums, differences and per-channel scales of branches (FastViT's
RepMixer), and channel concatenation.

Conventions: a kernel is ``(C_out, C_in/groups, kh, kw)`` and a bias ``(C_out,)`` (a linear layer is a 1x1 kernel).
A convolution reads its input zero-padded by ``padding``. Every function returns float64 tensors on the device of
its inputs; callers cast once, at the end. Asymmetric kernels (ACNet's 1xk and kx1) are centred into kxk by
:func:`repvgg_tools.fusion.core.pad_kernel`, which accepts ``(kh, kw)`` sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .core import _f64, fuse_bn, fuse_conv_bn, identity_kernel, pad_kernel

__all__ = [
    "fuse_bn_before",
    "bn_branch",
    "avg_pool_kernel",
    "regroup_kernel",
    "dilate_kernel",
    "compose_convs",
    "merge_1x1_kxk",
    "scale_branch",
    "add_branches",
    "subtract_branches",
    "concat_branches",
    "pad_kernel",
    "identity_kernel",
]


def fuse_bn_before(
    kernel: Tensor, bias: Tensor | None, groups: int, running_mean: Tensor, running_var: Tensor, eps: float,
    bn_weight: Tensor | None = None, bn_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold an inference-mode BatchNorm that *precedes* a convolution or linear layer (RepViT's NormLinear).

    ``conv(BN(x)) = conv'(x)`` with ``W'[o, i] = W[o, i] * s[c(o, i)]`` and ``b' = b + sum W * t[c(o, i)]``, where
    ``BN(x) = s * x + t`` and ``c(o, i)`` is the input channel that tap reads.

    Exact for a linear layer and for a convolution with zero padding. With padding > 0 it is exact only when the
    BN output is padded with ``t`` (the value BN gives a zero input) instead of zeros; otherwise the border differs.

    Args:
        kernel: ``(C_out, C_in/groups, kh, kw)``; a linear weight as ``(C_out, C_in, 1, 1)``.
        bias: ``(C_out,)`` or ``None``.
        groups: of the convolution.
        running_mean, running_var, eps, bn_weight, bn_bias: the BatchNorm over ``C_in`` channels.

    Returns:
        ``(kernel, bias)`` in float64, shapes as the input kernel and ``(C_out,)``.
    """
    scale, shift = fuse_bn(running_mean, running_var, eps, bn_weight, bn_bias)
    c_out, c_in_g = kernel.shape[:2]
    if scale.numel() != c_in_g * groups:
        raise ValueError(f"BatchNorm has {scale.numel()} channels but the convolution reads {c_in_g * groups}")
    # input channel of K[o, i] is group(o) * C_in/g + i
    s = scale.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g).reshape(c_out, c_in_g)
    t = shift.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g).reshape(c_out, c_in_g)
    k = _f64(kernel)
    new_bias = (k.sum((2, 3)) * t).sum(1)
    if bias is not None:
        new_bias = new_bias + _f64(bias)
    return k * s[:, :, None, None], new_bias


def bn_branch(
    channels: int, kernel_size: int | Sequence[int], groups: int, running_mean: Tensor, running_var: Tensor,
    eps: float, bn_weight: Tensor | None = None, bn_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A BN-only (or, with identity statistics, identity) branch as a ``kxk`` grouped kernel: one-hot centre taps.

    Exact for any odd kernel size and any groups dividing ``channels`` (depthwise included), when the other
    branches pad by ``d * (k // 2)`` so that the centre tap reads the same pixel.

    Returns:
        ``(kernel, bias)``: ``(C, C/groups, kh, kw)`` and ``(C,)`` in float64.
    """
    eye = identity_kernel(channels, kernel_size, groups, dtype=torch.float64, device=running_mean.device)
    return fuse_conv_bn(eye, None, running_mean, running_var, eps, bn_weight, bn_bias, dtype=torch.float64)


def avg_pool_kernel(
    channels: int, kernel_size: int | Sequence[int], groups: int | None = None,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> Tensor:
    """Average pooling as a convolution: ``1/(kh*kw)`` on the group diagonal.

    Exact for ``AvgPool2d(k, stride, padding, count_include_pad=True, ceil_mode=False)`` with the conv's stride and
    padding equal to the pool's (with ``count_include_pad=False`` or ``ceil_mode=True`` the border divisor differs).

    Args:
        channels: ``C``.
        kernel_size: ``k`` or ``(kh, kw)``.
        groups: of the resulting conv; default ``channels`` (depthwise).

    Returns:
        ``(C, C/groups, kh, kw)``.
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    groups = channels if groups is None else groups
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, kh, kw, dtype=dtype, device=device)
    rows = torch.arange(channels, device=device)
    kernel[rows, rows % per_group] = 1.0 / (kh * kw)
    return kernel


def regroup_kernel(kernel: Tensor, groups: int, new_groups: int) -> Tensor:
    """The same convolution with fewer groups: the block-diagonal kernel with zeros between groups.

    Exact always. ``new_groups`` must divide ``groups`` (``new_groups=1`` gives the dense kernel).

    Args:
        kernel: ``(C_out, C_in/groups, kh, kw)``.

    Returns:
        ``(C_out, C_in/new_groups, kh, kw)``.
    """
    if groups == new_groups:
        return kernel
    if groups % new_groups:
        raise ValueError(f"cannot regroup {groups} groups into {new_groups}")
    c_out, c_in_g = kernel.shape[:2]
    ratio = groups // new_groups
    out = kernel.new_zeros(c_out, ratio, c_in_g, *kernel.shape[2:])
    sub = (torch.arange(c_out, device=kernel.device) // (c_out // groups)) % ratio
    out[torch.arange(c_out, device=kernel.device), sub] = kernel
    return out.reshape(c_out, ratio * c_in_g, *kernel.shape[2:])


def dilate_kernel(kernel: Tensor, factor: int | Sequence[int]) -> Tensor:
    """Insert ``factor - 1`` zeros between taps: a kernel at dilation ``d * factor`` as one at dilation ``d``.

    Exact always; the padding in pixels is unchanged. Shape ``(.., kh, kw) -> (.., (kh-1)*fh+1, (kw-1)*fw+1)``.
    """
    fh, fw = (factor, factor) if isinstance(factor, int) else tuple(factor)
    if fh == fw == 1:
        return kernel
    kh, kw = kernel.shape[-2:]
    out = kernel.new_zeros(*kernel.shape[:-2], (kh - 1) * fh + 1, (kw - 1) * fw + 1)
    out[..., ::fh, ::fw] = kernel
    return out


def compose_convs(
    first: tuple[Tensor, Tensor], first_stride: Sequence[int], first_dilation: Sequence[int], first_groups: int,
    second: tuple[Tensor, Tensor], second_stride: Sequence[int], second_dilation: Sequence[int], second_groups: int,
) -> tuple[Tensor, Tensor, tuple[int, int], tuple[int, int], int]:
    """One convolution equal to ``conv2(conv1(x))``: ``K[o, i] = sum_m K2[o, m] (*) K1[m, i]`` (a full correlation
    of the taps on a common dilated grid) and ``b = b2 + sum K2 * b1``.

    The result has stride ``s1 * s2``, dilation ``gcd(s1 * d2, d1)`` (``s1 * d2`` along a size-1 side of
    ``K1``), groups ``gcd(g1, g2)`` (a depthwise stage takes the other's groups) and reads ``x`` padded by
    ``p1 + s1 * p2``.

    Exact when the second convolution has no padding (``p2 = 0``: every tap it reads is a real conv1 output), or
    when the first is pointwise (1x1, stride 1, no padding) and its output is padded with ``b1`` (the value it gives
    a zero input), as DBB's "BN and pad" layer does. With ``p2 > 0`` and a zero-padded ``conv1`` output the border
    pixels differ: callers must refuse that case.

    Args:
        first, second: ``(kernel, bias)``: ``(C_mid, C_in/g1, kh1, kw1)``, ``(C_mid,)`` and
            ``(C_out, C_mid/g2, kh2, kw2)``, ``(C_out,)``.
        first_stride, first_dilation, second_stride, second_dilation: ``(h, w)`` pairs.
        first_groups, second_groups: of each convolution.

    Returns:
        ``(kernel, bias, stride, dilation, groups)``.
    """
    (k1, b1), (k2, b2) = first, second
    k1, b1, k2, b2 = _f64(k1), _f64(b1), _f64(k2), _f64(b2)
    c_mid, c_in = k1.shape[0], k1.shape[1] * first_groups
    c_out = k2.shape[0]
    if k2.shape[1] * second_groups != c_mid:
        raise ValueError(f"second conv reads {k2.shape[1] * second_groups} channels, first gives {c_mid}")
    spread, dilation, factor = [], [], []
    for s1, d1, d2, k in zip(first_stride, first_dilation, second_dilation, k1.shape[-2:], strict=True):
        d1 = s1 * d2 if k == 1 else d1  # one tap has no dilation: take the grid of the second conv's taps
        grid = math.gcd(s1 * d2, d1)  # every tap of the result falls on this grid
        dilation.append(grid)
        factor.append(d1 // grid)
        spread.append(s1 * d2 // grid)
    k1 = dilate_kernel(k1, factor)
    # a common group count (a depthwise stage takes the other stage's groups)
    g1, g2 = first_groups, second_groups
    g = math.gcd(g1, g2)
    k1, k2 = regroup_kernel(k1, g1, g), regroup_kernel(k2, g2, g)
    # per group and per tap j of K2: K[o, i, r*j : r*j + k1] += K2[o, :, j] @ K1[:, i] (batched over groups)
    co_g, cm_g, ci_g = c_out // g, c_mid // g, c_in // g
    (kh1, kw1), (kh2, kw2) = k1.shape[-2:], k2.shape[-2:]
    rh, rw = spread
    kernel = k1.new_zeros(g, co_g, ci_g, (kh2 - 1) * rh + kh1, (kw2 - 1) * rw + kw1)
    k1g = k1.reshape(g, cm_g, ci_g * kh1 * kw1)
    k2g = k2.reshape(g, co_g, cm_g, kh2, kw2)
    for jh in range(kh2):
        for jw in range(kw2):
            tap = torch.bmm(k2g[..., jh, jw], k1g).reshape(g, co_g, ci_g, kh1, kw1)
            kernel[..., jh * rh:jh * rh + kh1, jw * rw:jw * rw + kw1] += tap
    kernel = kernel.reshape(c_out, ci_g, *kernel.shape[-2:])
    k2sum = k2.sum((2, 3)).reshape(g, co_g, cm_g)
    bias = b2 + torch.bmm(k2sum, b1.reshape(g, cm_g, 1)).reshape(c_out)
    stride = (first_stride[0] * second_stride[0], first_stride[1] * second_stride[1])
    return kernel, bias, stride, (dilation[0], dilation[1]), g


def merge_1x1_kxk(
    first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor], groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """DBB's sequential 1x1 -> kxk merge: ``K = K2 (*) K1`` per group, ``b = b2 + sum K2 * b1``.

    Exact when the 1x1 output is padded with its own bias ``b1`` before the kxk conv (DBB's "BN and pad"), or when
    the kxk conv has no padding. With zero padding of the 1x1 output the border differs.

    Args:
        first: ``(C_mid, C_in/groups, 1, 1)``, ``(C_mid,)``.
        second: ``(C_out, C_mid/groups, k, k)``, ``(C_out,)``.
        groups: shared by both convolutions.

    Returns:
        ``(kernel, bias)``: ``(C_out, C_in/groups, k, k)`` and ``(C_out,)`` in float64.
    """
    if first[0].shape[-2:] != (1, 1):
        raise ValueError("merge_1x1_kxk needs a 1x1 first convolution")
    kernel, bias, *_ = compose_convs(first, (1, 1), (1, 1), groups, second, (1, 1), (1, 1), groups)
    return kernel, bias


def scale_branch(kernel: Tensor, bias: Tensor, scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """Per-output-channel (layer scale) or scalar multiple of a branch. Exact always.

    Args:
        kernel, bias: ``(C_out, ...)`` and ``(C_out,)``.
        scale: ``(C_out,)`` or a scalar.

    Returns:
        ``(kernel * scale, bias * scale)`` in float64.
    """
    s = _f64(torch.as_tensor(scale, device=kernel.device)).reshape(-1)
    return _f64(kernel) * s.reshape(-1, *([1] * (kernel.dim() - 1))), _f64(bias) * s


def add_branches(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], sign: float = 1.0) -> tuple[Tensor, Tensor]:
    """``a + sign * b`` of two branches with equal kernel shapes (pad with :func:`pad_kernel`, match groups with
    :func:`regroup_kernel` and dilation with :func:`dilate_kernel` first). Exact when both read the same input
    with the same stride and their centre taps read the same pixel (padding ``d * (k // 2)`` for odd kernels).

    Returns:
        ``(kernel, bias)`` in float64.
    """
    if a[0].shape != b[0].shape:
        raise ValueError(f"branch kernels differ in shape: {tuple(a[0].shape)} vs {tuple(b[0].shape)}")
    return _f64(a[0]) + sign * _f64(b[0]), _f64(a[1]) + sign * _f64(b[1])


def subtract_branches(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``a - b`` (FastViT's RepMixer ``mixer(x) - norm(x)``); conditions as :func:`add_branches`."""
    return add_branches(a, b, -1.0)


def concat_branches(branches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Channel concatenation of branches that read the same input: kernels stacked along ``C_out``.

    Exact when all branches share stride, dilation and alignment (as :func:`add_branches`) and have ``groups=1``
    (grouped branches are first made dense with :func:`regroup_kernel`: concatenation interleaves their groups).

    Returns:
        ``(kernel, bias)``: ``(sum C_out, C_in, kh, kw)`` and ``(sum C_out,)`` in float64.
    """
    if not branches:
        raise ValueError("concat_branches needs at least one branch")
    return torch.cat([_f64(k) for k, _ in branches]), torch.cat([_f64(b) for _, b in branches])
