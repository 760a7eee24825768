"""Build the module a fused sub-graph becomes, and check it: the original operations and the candidate both run in
float64 on a random input (border included), compared relative to the output scale."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..contract import max_errors
from .maps import AffineMap, as_pair
from .match import _BN_FORWARDS

__all__ = ["build_module", "check_replacement", "evaluate_subgraph", "float64_modules", "grouped_conv2d"]

log = logging.getLogger(__name__)


def build_module(m: AffineMap, node: fx.Node) -> nn.Module:
    shape, dtype = node.meta["tensor_meta"].shape, node.meta["tensor_meta"].dtype
    device = m.kernel.device
    # always a copy: a lone conv's kernel is still the model's own tensor
    kernel = m.kernel.to(dtype=dtype, device=device, copy=True)
    bias = m.bias.to(dtype=dtype, device=device, copy=True)
    co, ci = kernel.shape[0], kernel.shape[1] * m.groups
    if m.rank == 2:
        layer = nn.Linear(ci, co, device="meta")
        layer.weight = nn.Parameter(kernel[:, :, 0, 0].contiguous())
    else:
        layer = nn.Conv2d(ci, co, tuple(kernel.shape[-2:]), m.stride, m.padding, m.dilation, m.groups,
                          device="meta")
        layer.weight = nn.Parameter(kernel.contiguous())
    layer.bias = nn.Parameter(bias.contiguous())
    if tuple(shape[1:2]) != (co,):
        raise ValueError(f"fused {node.name} has {co} channels, the graph {shape[1]}")
    return layer


@torch.no_grad()
def check_replacement(gm, found, node: fx.Node, m: AffineMap, seed: int = 0) -> float:
    """max rel error, in float64 on a random input, between the original sub-graph and the replacement.

    The sub-graph's modules must hold float64 tensors (inside :func:`float64_modules`)."""
    shape = list(m.root.meta["tensor_meta"].shape)
    shape[0] = 1
    if m.rank == 4:  # twice the kernel plus two strides: outputs on both borders and inside, every tap read
        for i in (0, 1):
            extent = (m.kernel.shape[2 + i] - 1) * m.dilation[i] + 1
            # a pointwise map mixes channels only: 3x3 still shows any spatial op the analysis missed (a border
            # and a centre), at a quarter of the float64 work of 6x6 on the wide 1x1 convs that dominate it
            size = 3 if m.pointwise else max(6, 2 * extent + 2 * m.stride[i])
            shape[2 + i] = min(shape[2 + i], size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(m.kernel.device)
    if m.rank == 2:
        fused = F.linear(x, m.kernel[:, :, 0, 0].to(x), m.bias.to(x))
    else:
        fused = grouped_conv2d(x, m.kernel.to(x), m.bias.to(x), m.stride, m.padding, m.dilation,
                               m.groups)
    if m.post is not None:
        fused = found.analysis.modules[m.post](fused)
    try:
        ref = evaluate_subgraph(gm, found.analysis, m, node, x.clone())
    except Exception as exc:  # noqa: BLE001 - the original ops do not run in float64: cannot check, do not fuse
        log.warning("graph fuser: cannot evaluate %s in float64 (%s)", node.name, exc)
        return float("inf")
    if ref.shape != fused.shape:
        return float("inf")
    return max_errors(fused, ref)[1]


def evaluate_subgraph(gm, analysis, m: AffineMap, out: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """Run the original nodes of a sub-graph in float64 (its modules inside :func:`float64_modules`)."""
    env = {m.root: x}

    def value(n):
        if n in env:
            return env[n]
        c = analysis.consts[n]
        return c.clone() if isinstance(c, torch.Tensor) else c

    for node in sorted(m.nodes, key=analysis.order.__getitem__):
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        if node.op == "call_module":
            module = analysis.modules[node.target]
            if len(args) == 1 and not kwargs and _plain_conv(module):
                env[node] = grouped_conv2d(args[0], module.weight, module.bias, module.stride, module.padding,
                                           module.dilation, module.groups)
            elif len(args) == 1 and not kwargs and _plain_bn(module):  # its forward, less the call overhead
                env[node] = F.batch_norm(args[0], module.running_mean, module.running_var, module.weight,
                                         module.bias, False, 0.0, module.eps)
            else:
                env[node] = module(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        else:
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    return env[out]


def _plain_bn(module: nn.Module) -> bool:
    return type(module).forward in _BN_FORWARDS and not module.training and module.running_mean is not None


def _plain_conv(module: nn.Module) -> bool:
    return (type(module).forward is nn.Conv2d.forward and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0,
                   dilation=1, groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` (zero padding); grouped convs on small outputs as unfold + one batched matmul over the groups:
    the same values, but a depthwise float64 conv on a check's crop takes tens of microseconds instead of torch's
    CPU kernel's milliseconds (it loops over the groups). The float64 checks evaluate both the original convs and
    the candidate with it; ``tests/test_fuser_pipeline.py`` holds it to ``F.conv2d`` over groups, stride,
    padding, dilation and output size.

    Args:
        x: ``(N, C_in, H, W)``; weight: ``(C_out, C_in / groups, kh, kw)``; bias: ``(C_out,)`` or ``None``.
    """
    stride, padding, dilation = (as_pair(v) for v in (stride, padding, dilation))
    n, _, h, w = x.shape
    c_out, c_in_group, kh, kw = weight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if groups == 1 or kh * kw * oh * ow > 2048:  # measured: beyond this the unfolded input costs more than the loop
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C_in*kh*kw, L)
    cols = cols.view(n, groups, c_in_group * kh * kw, -1)
    out = torch.matmul(weight.reshape(groups, c_out // groups, -1), cols)  # (N, groups, C_out/groups, L)
    out = out.reshape(n, c_out, -1)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1)
    return out.reshape(n, c_out, oh, ow)


@contextmanager
def float64_modules(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Give ``modules`` (and their children) float64 copies of their floating-point parameters and buffers, so
    that calling them computes in float64; on exit the original tensors (the same objects) are put back."""
    saved = []
    try:
        for module in modules:
            for sub in module.modules():
                for store in (sub._parameters, sub._buffers):
                    for key, t in store.items():
                        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
                            continue
                        saved.append((store, key, t))
                        t64 = t.detach().double()
                        store[key] = nn.Parameter(t64, requires_grad=False) if isinstance(t, nn.Parameter) else t64
        yield
    finally:
        for store, key, t in reversed(saved):
            store[key] = t
