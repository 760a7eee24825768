"""Build the module a fused sub-graph becomes, and check it: the original operations and the candidate both run in
float64 on a random input (border included), compared relative to the output scale."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_maps import AffineMap

__all__ = ["build_module", "check_replacement", "evaluate_subgraph", "call64"]

log = logging.getLogger(__name__)


def build_module(m: AffineMap, node: fx.Node) -> nn.Module:
    shape, dtype = node.meta["tensor_meta"].shape, node.meta["tensor_meta"].dtype
    device = m.kernel.device
    kernel, bias = m.kernel.to(dtype=dtype, device=device), m.bias.to(dtype=dtype, device=device)
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
    """max rel error, in float64 on a random input, between the original sub-graph and the replacement."""
    shape = list(m.root.meta["tensor_meta"].shape)
    shape[0] = 1
    if m.rank == 4:  # any size that covers the kernel a few times over checks every tap, the border included
        for i in (0, 1):
            extent = (m.kernel.shape[2 + i] - 1) * m.dilation[i] + 1
            shape[2 + i] = min(shape[2 + i], max(12, 2 * extent + 2 * m.stride[i]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(m.kernel.device)
    if m.rank == 2:
        fused = F.linear(x, m.kernel[:, :, 0, 0].to(x.device), m.bias.to(x.device))
    else:
        fused = F.conv2d(x, m.kernel.to(x.device), m.bias.to(x.device), m.stride, m.padding, m.dilation, m.groups)
    if m.post is not None:
        fused = call64(gm.get_submodule(m.post), (fused,), {})
    try:
        ref = evaluate_subgraph(gm, found.analysis, m, node, x.clone())
    except Exception as exc:  # noqa: BLE001 - the original ops do not run in float64: cannot check, do not fuse
        log.warning("graph fuser: cannot evaluate %s in float64 (%s)", node.name, exc)
        return float("inf")
    if ref.shape != fused.shape:
        return float("inf")
    scale = ref.abs().max().item()
    return (fused - ref).abs().max().item() / scale if scale > 0 else float((fused - ref).abs().max().item() > 0)


def evaluate_subgraph(gm, analysis, m: AffineMap, out: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """Run the original nodes of a sub-graph in float64 (modules through functional_call with float64 tensors)."""
    env = {m.root: x}

    def value(n):
        if n in env:
            return env[n]
        c = analysis.consts[n]
        return c.clone() if isinstance(c, torch.Tensor) else c

    for node in gm.graph.nodes:
        if node not in m.nodes:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        if node.op == "call_module":
            env[node] = call64(gm.get_submodule(node.target), tuple(args), kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        else:
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    return env[out]


def call64(module: nn.Module, args: tuple, kwargs: dict):
    """Call a module with its floating-point parameters and buffers in float64 (the module is not changed)."""
    tensors = {k: (v.double() if v.is_floating_point() else v)
               for k, v in [*module.named_parameters(), *module.named_buffers()]}
    return torch.func.functional_call(module, tensors, args, kwargs)
