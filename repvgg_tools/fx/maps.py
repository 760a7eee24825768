"""The algebra of affine conv maps: one affine operation (:class:`Op`) applied after a map, sums and
concatenations of maps of one root, each refused (:class:`Refused`, with the reason the report shows) where the
result would not be exactly one convolution or would cost more than the convolutions it replaces.

A map is ``value = conv(root; kernel, stride, padding, dilation, groups) + bias`` in float64, the root read with
zero padding. The tensor math is :mod:`repvgg_tools.fusion.ops`; :mod:`repvgg_tools.fx.match` builds maps from a
traced graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from ..fusion import ops

__all__ = ["Op", "AffineMap", "Refused", "apply_op", "merge_sum", "merge_cat", "as_pair", "evolve"]


@dataclass
class Op:
    """One affine operation on a single tensor input, as a conv: ``y = conv(x; kernel, ...) + bias``.

    ``kind`` is ``"identity"``, ``"diag"`` (per-channel scale/shift: BN, layer scale, bias), ``"conv"`` (a kernel:
    conv, linear, avg pool), ``"pad"`` (constant padding by ``padding`` with per-channel ``bias`` values) or
    ``"crop"`` (``x[..., a:-a, b:-b]`` for ``padding`` ``(a, b)``: a negative padding of the map before it).
    """

    kind: str
    kernel: Tensor | None = None
    bias: Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    label: str = ""
    weighted: int = 1  # 0 for a pool: a kernel without weights
    tol: float = 1e-9  # relative tolerance of a pad value check
    post: str | None = None  # an activation module (path) the op applies after itself (timm's BatchNormAct2d)


@dataclass
class AffineMap:
    """``value = conv(root) + bias``; ``nodes`` are the graph nodes it absorbs (the root excluded). The bias is
    float64; so is the kernel once anything is composed into it (a lone conv's kernel is the module's own tensor,
    converted only when used: read it with ``.to(torch.float64)``)."""

    root: fx.Node
    kernel: Tensor
    bias: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    rank: int
    nodes: frozenset = frozenset()
    kernel_ops: int = 0  # convs, linears and pools absorbed
    cost: int = 0  # their weights' element count
    identity: bool = True  # no op changed values (identity, dropout)
    weighted: int = 0  # convs and linears with weights among kernel_ops (pools are not)
    post: str | None = None  # activation module (path) applied after the map: the value is not affine
    labels: tuple = ()

    @property
    def pointwise(self) -> bool:
        return tuple(self.kernel.shape[-2:]) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def describe(self) -> str:
        kh, kw = self.kernel.shape[-2:]
        co, ci = self.kernel.shape[0], self.kernel.shape[1] * self.groups
        if self.rank == 2:
            return f"Linear({ci}->{co})"
        return (f"Conv2d({ci}->{co}, {kh}x{kw}, stride {self.stride[0]}, padding {self.padding[0]}, "
                f"dilation {self.dilation[0]}, groups {self.groups})")


def evolve(obj, **changes):
    """``dataclasses.replace`` for these plain dataclasses (no ``__post_init__``, no init-only fields) at a fifth
    of its cost: the planner makes thousands per model."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


class Refused(ValueError):
    """A composition that is not exact or not worth it; the message is the reason shown in the report."""


def as_pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _tiny(bias: Tensor, ref: Tensor, tol: float = 1e-9) -> bool:
    scale = max(1.0, float(ref.detach().abs().max()) if ref.numel() else 1.0)
    return bool((bias.detach().abs() <= tol * scale).all())


def apply_op(m: AffineMap, op: Op) -> AffineMap:
    """``op`` applied after ``m``; raises :class:`Refused` where the result is not exactly one convolution."""
    labels = m.labels + (op.label,)
    if op.kind == "identity":
        return evolve(m, labels=labels)
    if op.kind == "diag":
        k, b = ops.scale_branch(m.kernel, m.bias, op.kernel.reshape(-1))
        return evolve(m, kernel=k, bias=b + op.bias, identity=False, labels=labels)
    if op.kind == "crop":
        pad = (m.padding[0] - m.stride[0] * op.padding[0], m.padding[1] - m.stride[1] * op.padding[1])
        return evolve(m, padding=pad, identity=False, labels=labels)
    if op.kind == "pad":
        if tuple(m.kernel.shape[-2:]) != (1, 1) or m.stride != (1, 1) or m.rank != 4 \
                or not all(_border_is_bias(m, i) for i in (0, 1) if op.padding[i]):
            raise Refused(f"{op.label}: padding after a {m.kernel.shape[-1]}x{m.kernel.shape[-2]} stride "
                          f"{m.stride[0]} map is not one convolution")
        if not _tiny(m.bias - op.bias, m.bias, op.tol):
            raise Refused(f"{op.label}: pads with values other than the bias of the map before it: the border "
                          f"would differ")
        pad = (m.padding[0] + op.padding[0], m.padding[1] + op.padding[1])
        return evolve(m, padding=pad, identity=False, labels=labels)
    # a kernel after the map
    if op.padding != (0, 0):
        if not all(_border_is_bias(m, i) for i in (0, 1) if op.padding[i]):
            raise Refused(f"{op.label}: padded {tuple(op.kernel.shape[-2:])} kernel after a "
                          f"{tuple(m.kernel.shape[-2:])} stride {m.stride[0]} padding {m.padding[0]} map: the "
                          f"border would differ")
        if not _tiny(m.bias, m.kernel):
            raise Refused(f"{op.label}: zero padding after a non-zero bias (BN or conv bias before a padded conv): "
                          f"the border would differ (exact only when padded with the bias value)")
    if m.identity and m.padding == (0, 0):
        k, b, stride, dil, g = op.kernel, op.bias, op.stride, op.dilation, op.groups
        pad = op.padding
    else:
        _refuse_growth(m, op)
        try:
            k, b, stride, dil, g = ops.compose_convs((m.kernel, m.bias), m.stride, m.dilation, m.groups,
                                                     (op.kernel, op.bias), op.stride, op.dilation, op.groups)
        except ValueError as exc:
            raise Refused(f"{op.label}: {exc}") from exc
        pad = (m.padding[0] + m.stride[0] * op.padding[0], m.padding[1] + m.stride[1] * op.padding[1])
    return evolve(m, kernel=k, bias=b, stride=stride, padding=pad, dilation=dil, groups=g, identity=False,
                   kernel_ops=m.kernel_ops + 1, cost=m.cost + op.kernel.numel(), weighted=m.weighted + op.weighted,
                   labels=labels)


def _border_is_bias(m: AffineMap, i: int) -> bool:
    """Along spatial axis ``i``, would ``m`` evaluated one step past its output's edges read only the root's zero
    padding (so give its bias there)? Then zero-padding ``m``'s output along ``i`` (by a pad or a padded conv after
    it) equals padding the root more: exact when ``m``'s bias is zero (or is the pad value). With stride 1 the
    window at output -1 covers root rows ``-1 - p .. -1 - p + d (k - 1)`` and the one at the far edge mirrors it:
    both lie in the padding iff ``d (k - 1) <= p``. A 1xk map (padding 0 across) before a kx1 padded conv, a
    pointwise map, a 1x1 map padded with its bias: yes; a padded 3x3, a valid 3x3 or a crop: no."""
    return m.stride[i] == 1 and m.dilation[i] * (m.kernel.shape[2 + i] - 1) <= m.padding[i]


def _refuse_growth(m: AffineMap, op: Op) -> None:
    """Refuse, before computing it, a conv-after-conv merge that needs more weights than both convs (a depthwise
    kxk followed by a 1x1 expansion becomes a dense kxk); pools (no weights) may grow a branch that a later sum
    absorbs (DBB's 1x1 -> avg pool), and so may a merge that keeps the groups (a depthwise 1xk -> kx1 pair next to
    a kxk branch, RepNeXt): it grows only spatially, and the planner cuts it if no sum absorbs it."""
    if not op.weighted or m.kernel_ops == 0:
        return
    c_out, c_in = op.kernel.shape[0], m.kernel.shape[1] * m.groups
    g = math.gcd(m.groups, op.groups)
    if g == m.groups == op.groups:
        return
    size = 1
    for i in (0, 1):
        d1 = m.stride[i] * op.dilation[i] if m.kernel.shape[2 + i] == 1 else m.dilation[i]
        grid = math.gcd(m.stride[i] * op.dilation[i], d1)
        size *= (op.kernel.shape[2 + i] - 1) * (m.stride[i] * op.dilation[i] // grid) \
            + (m.kernel.shape[2 + i] - 1) * (d1 // grid) + 1
    merged = c_out * (c_in // g) * size
    if merged > m.cost + op.kernel.numel():
        raise Refused(f"{op.label}: merging it with the conv before it would need {merged} weights instead of "
                      f"{m.cost + op.kernel.numel()}")


def _align(maps: list[AffineMap]) -> list[AffineMap]:
    """Bring maps of one root to a common dilation, padding, kernel size and groups (centred, zero taps)."""
    if len({m.stride for m in maps}) != 1 or len({m.rank for m in maps}) != 1:
        raise Refused("branches differ in stride")
    # a common dilation; a side with one tap has none, so it takes any
    dil = tuple(math.gcd(*[m.dilation[i] for m in maps if m.kernel.shape[2 + i] > 1] or [1]) for i in (0, 1))
    out = []
    for m in maps:
        factor = [m.dilation[i] // dil[i] if m.kernel.shape[2 + i] > 1 else 1 for i in (0, 1)]
        out.append(evolve(m, kernel=ops.dilate_kernel(m.kernel, factor), dilation=dil))
    pads = [max(m.padding[i] for m in out) for i in (0, 1)]
    sizes = []
    for m in out:
        lefts = []
        for i in (0, 1):
            diff = pads[i] - m.padding[i]
            if diff % dil[i]:
                raise Refused("branch centres do not fall on one dilated grid")
            lefts.append(diff // dil[i])
        sizes.append((m.kernel.shape[-2] + 2 * lefts[0], m.kernel.shape[-1] + 2 * lefts[1]))
    if len(set(sizes)) != 1:
        raise Refused("branches are not centred on the same pixel (kernel extent and padding disagree)")
    g = math.gcd(*[m.groups for m in out])
    return [evolve(m, kernel=ops.regroup_kernel(_padded(m.kernel, sizes[0]), m.groups, g), groups=g,
                    padding=tuple(pads)) for m in out]


def _padded(kernel: Tensor, size: tuple[int, int]) -> Tensor:
    return kernel if tuple(kernel.shape[-2:]) == tuple(size) else ops.pad_kernel(kernel, size)


def _combine(maps: list[AffineMap], kernel: Tensor, bias: Tensor) -> AffineMap:
    first = maps[0]
    return evolve(first, kernel=kernel, bias=bias, nodes=frozenset().union(*[m.nodes for m in maps]),
                   kernel_ops=sum(m.kernel_ops for m in maps), cost=sum(m.cost for m in maps),
                   identity=all(m.identity for m in maps) and len(maps) == 1,
                   weighted=sum(m.weighted for m in maps), labels=sum((m.labels for m in maps), ()))


def merge_sum(a: AffineMap, b: AffineMap, sa: float, sb: float) -> AffineMap:
    """``sa * a + sb * b`` of two maps of one root."""
    if a.kernel.shape[0] != b.kernel.shape[0]:
        raise Refused("branches differ in channels")
    a, b = _align([a, b])
    # one pass over the (often large) kernels in the usual case, a + b or a - b
    ka, kb = a.kernel.to(torch.float64), b.kernel.to(torch.float64)
    k = torch.add(ka, kb, alpha=sb) if sa == 1 else sa * ka + sb * kb
    return evolve(_combine([a, b], k, sa * a.bias + sb * b.bias), identity=False)


def merge_cat(parts: list[AffineMap]) -> AffineMap:
    """Channel concatenation of maps of one root (dense kernels: concatenation interleaves groups)."""
    parts = _align(parts)
    dense = [ops.regroup_kernel(p.kernel, p.groups, 1) for p in parts]
    k, b = ops.concat_branches(list(zip(dense, [p.bias for p in parts], strict=True)))
    return evolve(_combine(parts, k, b), groups=1, identity=False)
