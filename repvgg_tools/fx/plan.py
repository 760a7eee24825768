"""Which affine sub-graphs to materialize: the fixed point of cuts over :class:`repvgg_tools.fx.match.Analysis`,
and a structural pre-scan that tells, from the trace alone, whether anything could fuse."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx, nn

from .match import _ADD, _CAT, _DIV, _DROPOUTS, _IDENTITY_METHODS, _MUL, _SUB, Analysis

__all__ = ["Plan", "plan", "may_fuse", "is_identity"]


@dataclass
class Plan:
    """What to materialize: ``outputs`` maps each node to its map; ``refusals`` says why joins were cut."""

    outputs: dict = field(default_factory=dict)
    refusals: dict = field(default_factory=dict)


_AFFINE_FUNCTIONS = _ADD | _SUB | _MUL | _DIV | _CAT | _IDENTITY_METHODS | {
    F.pad, F.batch_norm, F.conv2d, F.linear, F.avg_pool2d, F.dropout}
_AFFINE_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.Linear,
                   nn.modules.pooling._AvgPoolNd, nn.Identity, *_DROPOUTS)


def may_fuse(graph: fx.Graph, root: nn.Module, modules: dict | None = None) -> bool:
    """A cheap structural pre-scan (no shapes, no values): is any possibly-affine op fed by another one?

    ``False`` means :func:`plan` would find nothing (a deployed network: every conv feeds a non-linearity), so the
    forward passes it needs can be skipped.
    """
    modules = modules if modules is not None else dict(root.named_modules())
    consts: set = set()  # parameters, buffers and what is computed from them alone
    for node in graph.nodes:
        if node.op == "get_attr" or (node.op in ("call_function", "call_method") and node.all_input_nodes
                                     and all(n in consts for n in node.all_input_nodes)):
            consts.add(node)

    def affine(node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), _AFFINE_MODULES)
        if node.op not in ("call_function", "call_method") or node.target not in _AFFINE_FUNCTIONS:
            return False
        if node.target in _MUL or node.target in _DIV:  # a product of two computed tensors is not affine
            return any(not isinstance(a, fx.Node) or a in consts for a in node.args[:2])
        return True

    def passthrough(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules.get(node.target), (nn.Identity, *_DROPOUTS))

    for node in graph.nodes:
        if not affine(node) or passthrough(node):
            continue
        seen, todo = set(), list(node.users)
        while todo:
            user = todo.pop()
            if user in seen:
                continue
            seen.add(user)
            if passthrough(user):
                todo.extend(user.users)
            elif affine(user):
                return True
    return False


def is_identity(analysis: Analysis, node: fx.Node) -> bool:
    """An op that passes its input through unchanged (Identity, eval Dropout, ``contiguous``)."""
    op = analysis.ops.get(node)
    return bool(op) and op[0] == "unary" and op[2].kind == "identity"


def _is_diag(analysis: Analysis, node: fx.Node) -> bool:
    op = analysis.ops.get(node)
    return bool(op) and op[0] == "unary" and op[2].kind in ("diag", "identity")


def plan(gm, max_passes: int = 12, modules: dict | None = None) -> Plan:
    """Find the maximal affine sub-graphs of a shape-propagated graph and the single conv each equals.

    Iterates: compute maps with the current cuts, materialize each affine node read by a non-affine user (or
    by a cut), cut kernels shared by several materialized sub-graphs (so no conv is computed twice) and sub-graphs
    whose merged kernel costs more than the convs it replaces (e.g. a depthwise 7x7 followed by a 1x1
    expansion), until nothing changes.
    """
    analysis = Analysis(gm, modules)
    cuts: set = set()
    result = Plan()
    vals, last_cuts = None, None
    for _ in range(max_passes):
        before = set(cuts)
        vals = analysis.maps(cuts, vals, last_cuts)
        last_cuts = set(before)
        outputs = {}
        for node, m in vals.items():
            users = list(node.users)
            absorbed = users and node not in cuts and all(u in vals and node in vals[u].nodes for u in users)
            if not absorbed:
                outputs[node] = m
        for node in outputs:  # a value computed anyway is read, not recomputed, by the sub-graphs that absorb it
            if any(node in m.nodes for other, m in outputs.items() if other is not node):
                cuts.add(node)
        for m in outputs.values():
            if min(m.padding) < 0:  # a crop no padding makes up for: cut it, the conv after it reads it
                for n in m.nodes:
                    if (op := analysis.ops.get(n)) and op[0] == "unary" and op[2].kind == "crop" and n not in cuts:
                        cuts.add(n)
                        analysis.refusals[n] = (f"{n.name}: cropped input that no padded branch of "
                                                f"{m.describe()} evens out (padding {m.padding}): kept as it is")
            if m.kernel_ops > 1 and m.kernel.numel() > m.cost:
                joined = [n for n in m.nodes if (op := analysis.ops.get(n)) and op[0] == "unary"
                          and op[2].kind == "conv" and op[1] in m.nodes and op[1] in vals
                          and vals[op[1]].kernel_ops > 0]
                for n in joined:
                    cuts.add(n.args[0])
                    analysis.refusals[n.args[0]] = (f"merging into {m.describe()} would cost "
                                                    f"{m.kernel.numel()} weights instead of {m.cost}")
        if cuts != before:
            continue
        owners: dict = {}
        for node, m in outputs.items():
            for n in m.nodes:
                op = analysis.ops.get(n)
                if op and op[0] == "unary" and op[2].kind == "conv":
                    owners.setdefault(n, []).append(node)
        for n, outs in owners.items():
            if len(outs) > 1:
                cuts.add(n)
                analysis.refusals.setdefault(n, "shared by several sub-graphs: kept as its own conv")
        if cuts == before:
            break
    # whatever the passes left, fuse only sub-graphs that no other materialized sub-graph reads into
    shared = {n for node, m in outputs.items() for n in m.nodes if n in outputs and n is not node}
    counts: dict = {}
    for m in outputs.values():
        for n in m.nodes:
            counts[n] = counts.get(n, 0) + 1
    result.outputs = {node: m for node, m in outputs.items()
                      if node not in shared and all(counts[n] == 1 or _is_diag(analysis, n) for n in m.nodes)}
    result.refusals = analysis.refusals
    result.analysis = analysis
    return result
