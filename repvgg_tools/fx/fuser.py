"""The graph fuser: reparameterize any network by reading its graph, no per-block method needed.

:func:`graph_fuse` traces a model with ``torch.fx``, finds every maximal affine sub-graph (convs, BatchNorms,
linears, average pools, constant pads, sums, differences, layer scales and concatenations that share one input and
end in one output; see :mod:`repvgg_tools.fx.match`), computes the single convolution each equals in float64,
checks it on random inputs against the original operations in float64, and only then swaps it in. The model is
traced once; the smallest module whose ``forward`` contains a sub-graph is replaced by a ``torch.fx.GraphModule``
of its forward, cut out of that trace and rewritten, so the model keeps its class and its other modules. A
:class:`FuseReport` lists what was fused, what was not and why. Untraceable modules are skipped with a warning
(their children are tried one by one), never guessed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..contract import GRAPH_FUSER_RTOL as VERIFY_RTOL  # this, or 10 ulp of the model's dtype if larger
from ..io.errors import one_line
from . import plan as graph_plan
from .check import build_module, check_replacement, float64_modules
from .maps import AffineMap
from .rewrite import FusedItem, assemble, join, plan_rewrites, within
from .trace import FusionTracer, Traced, propagate

__all__ = ["FuseReport", "FusedItem", "graph_fuse", "example_inputs_for", "VERIFY_RTOL"]

log = logging.getLogger(__name__)


@dataclass
class FuseReport:
    """What :func:`graph_fuse` did: ``fused`` replacements, ``unfused`` (where, reason) pairs and ``skipped``
    (module, reason) pairs for modules that could not be traced. :func:`repvgg_tools.reparameterize` adds the
    blocks' own methods: ``methods`` (where, method, how it was checked) for those used and ``undone`` (where,
    method, why) for those whose result was refused (the block was restored and left to the graph path)."""

    fused: list[FusedItem] = field(default_factory=list)
    unfused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    methods: list[tuple[str, str, str]] = field(default_factory=list)
    undone: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} sub-graphs, {len(self.unfused)} left unfused, "
                 f"{len(self.skipped)} modules not traced"]
        lines += [f"  fused {f.module or '<model>'}:{f.node}: {' + '.join(f.before)} -> {f.after} "
                  f"(rel err {f.max_rel:.1e})" for f in self.fused]
        lines += [f"  unfused {where}: {why}" for where, why in self.unfused]
        lines += [f"  not traced {where}: {why}" for where, why in self.skipped]
        lines += [f"  method {where or '<model>'}.{name}(): used ({how})" for where, name, how in self.methods]
        lines += [f"  method {where or '<model>'}.{name}(): undone, {why}; left to the graph path"
                  for where, name, why in self.undone]
        return "\n".join(lines)


@dataclass
class _Context:
    model: nn.Module
    candidates: list  # example inputs to try, in order
    report: FuseReport
    leaves: tuple
    rtol: float
    whole_model: bool = False
    top_mode: bool = False  # the model's training flag, which the modules the fuser creates take
    inputs: dict | None = None  # each module's first call arguments, captured once the top cannot be traced
    noted: list = field(default_factory=list)  # paths whose unfused sub-graphs are in the report
    replacements: list = field(default_factory=list)  # (path, build(fetch) -> module) for :func:`assemble`
    seed: int = 0


def example_inputs_for(model: nn.Module, size: int = 64) -> list[tuple]:
    """Candidate random inputs: ``(1, C, size, size)`` for each distinct ``in_channels`` of the Conv2d modules (in
    registration order, at most three), then ``(1, C)`` for the first Linear."""
    shapes: list[tuple] = []
    like = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and (1, m.in_channels, size, size) not in shapes and len(shapes) < 3:
            shapes.append((1, m.in_channels, size, size))
            like = like if like is not None else m.weight
    linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if linear is not None:
        shapes.append((1, linear.in_features))
        like = like if like is not None else linear.weight
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(*s, generator=gen).to(like.dtype).to(like.device),) for s in shapes]


def graph_fuse(
    model: nn.Module, example_inputs: tuple | None = None, *, inplace: bool = False, leaf_modules: tuple = (),
    rtol: float = VERIFY_RTOL, whole_model: bool = False,
) -> tuple[nn.Module, FuseReport]:
    """Fuse every affine sub-graph of ``model`` into one convolution (or linear), checked numerically.

    No module method is called: the structure is read from the traced graph. Use
    :func:`repvgg_tools.reparameterize` for the full conversion (blocks' own methods first, then this).

    Args:
        model: the model; BatchNorms use running statistics (the model is evaluated in eval mode and the modules
            it keeps get their training flags back).
        example_inputs: positional inputs of one forward call; default: a ``(1, C, 64, 64)`` random image sized
            from the first Conv2d. Only shapes matter; the checks use fresh random inputs.
        inplace: modify ``model`` instead of returning a copy (replaced sub-modules are swapped in place; a model
            whose own ``forward`` holds a sub-graph other than a plain conv -> BN chain is returned as a new
            GraphModule either way). Without it,
            ``model`` is read but never changed, and only what the fused model keeps is copied; while the call
            runs, though, ``model`` is in eval mode with float64 tensors swapped in for the checks (the same
            objects go back), so do not use it from another thread meanwhile.
        leaf_modules: extra module classes the tracer must not enter (e.g. ones with data-dependent control flow).
        rtol: float64 tolerance of each replacement's check.
        whole_model: rewrite the traced model itself as one GraphModule (a little faster: one GraphModule instead
            of one per rewritten module, but the model's class and methods give way to the GraphModule's
            ``forward``).

    Returns:
        ``(fused model, report)``.
    """
    report = FuseReport()
    modes, top_mode = {m: m.training for m in model.modules()}, model.training
    if any(t is not None and t.is_meta for m in modes for t in (*m._parameters.values(), *m._buffers.values())):
        report.skipped.append(("<model>", "meta tensors hold no values to fuse or check"))
        return (model if inplace else copy.deepcopy(model)), report
    # the model is read where it is (eval mode, float64 tensors swapped in for the checks; the same objects and
    # flags are put back), and only what the fused model keeps is copied: the branches it drops never are
    for m in modes:
        m.training = False
    try:
        if example_inputs is None:
            candidates = example_inputs_for(model)
        else:
            candidates = [example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)]
        ctx = _Context(model, candidates, report, tuple(leaf_modules), rtol, whole_model, top_mode)
        _fuse_module(model, "", ctx)
    finally:
        for m, mode in modes.items():
            m.training = mode
    fused = assemble(model, ctx.replacements, inplace)
    _warn_left_in_untraced(fused, report)
    log.info("graph fuser: %s", report)
    return fused, report


def _warn_left_in_untraced(model: nn.Module, report: FuseReport) -> None:
    """One warning naming the untraceable modules whose own forward still holds BatchNorms (not fused)."""
    left = []
    for path, reason in report.skipped:
        try:
            module = model.get_submodule(path) if path in dict(model.named_modules()) else model
        except AttributeError:
            continue
        direct = [n for n, m in module.named_children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if direct:
            left.append(f"{path or type(model).__name__} ({', '.join(direct)}; {reason})")
    if left:
        log.warning("graph fuser: could not trace %s: the BatchNorms its forward calls stay unfused",
                    "; ".join(left))


def _capture_inputs(model: nn.Module, candidates: list[tuple]) -> dict | None:
    """Run one forward and keep each module's first call arguments (for the shapes of sub-modules traced alone)."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen.setdefault(id(module), (args, kwargs))

    errors = []
    for inputs in candidates:
        seen.clear()
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
        try:
            with torch.no_grad():
                model(*inputs)
            return seen
        except Exception as exc:  # noqa: BLE001 - a model that needs other inputs: try the next, then say so
            errors.append(one_line(exc))
        finally:
            for h in handles:
                h.remove()
    _warn_no_input(errors)
    return None


def _warn_no_input(errors: list[str]) -> None:
    log.warning("graph fuser: the model did not run on an example input (%s); pass example_inputs",
                "; ".join(errors) or "no Conv2d or Linear to size one from")




def _shapes(module: nn.Module, graph: fx.Graph, modules: dict, constants: dict, ctx: _Context) -> bool:
    """Shape-propagate ``module``'s graph: with its captured inputs, or at the top with each example in turn."""
    if ctx.inputs is not None:
        captured = ctx.inputs.get(id(module))
        if captured is None:  # not called by the model's forward
            return False
        propagate(module, graph, *captured, modules, constants)
        return True
    errors = []
    for inputs in ctx.candidates:
        try:
            propagate(module, graph, inputs, {}, modules, constants)
            return True
        except Exception as exc:  # noqa: BLE001 - a model that needs other inputs: try the next, then say so
            errors.append(one_line(exc))
    _warn_no_input(errors)
    ctx.report.skipped.append(("<model>", "no example input: pass example_inputs"))
    return False


def _fuse_module(module: nn.Module, path: str, ctx: _Context) -> None:
    """Trace ``module`` once and plan the rewrite of every sub-graph found in it (``ctx.replacements``); if it
    cannot be traced, its children one by one."""
    tracer = FusionTracer(ctx.leaves)
    try:
        graph = tracer.trace(module)
        modules = dict(module.named_modules())
        if not graph_plan.may_fuse(graph, module, modules):  # nothing to fuse (a deployed network): no forward pass
            return
        if not _shapes(module, graph, modules, tracer.constants, ctx):
            return
    except Exception as exc:  # noqa: BLE001 - untraceable: skip it, try its children
        reason = f"{type(exc).__name__}: {one_line(exc)[:160] if str(exc) else ''}"
        ctx.report.skipped.append((path or type(module).__name__, reason))
        log.info("graph fuser: cannot trace %s (%s); trying its children", path or type(module).__name__, reason)
        if ctx.inputs is None:
            ctx.inputs = _capture_inputs(ctx.model, ctx.candidates) or {}
        for name, child in module.named_children():
            if not _torch_leaf(child):  # a torch BatchNorm, conv or activation alone has nothing to fuse
                _fuse_module(child, join(path, name), ctx)
        return
    traced = Traced(module, graph, tracer.calls, tracer.constants)
    found = graph_plan.plan(traced, modules=modules)
    if not any(within(path, p) for p in ctx.noted):  # once per traced region
        _note_unfused(found, path, ctx)
        ctx.noted.append(path)
    todo = {n: m for n, m in found.outputs.items() if _worth_fusing(found, m)}
    accepted = _accept(traced, found, todo, path, ctx) if todo else []
    if accepted:
        ctx.replacements += plan_rewrites(module, traced, found, accepted, path,
                                          whole=ctx.whole_model and not path, report=ctx.report,
                                          training=ctx.top_mode)


def _torch_leaf(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.") and not module._modules


def _accept(traced: Traced, found, todo: dict, path: str, ctx: _Context) -> list[tuple]:
    """Build each sub-graph's module and check it against the original operations in float64; ``(node, map,
    module, rel err)`` of those within tolerance (the others go to the report)."""
    accepted = []
    modules = [found.analysis.modules[n.target] for m in todo.values() for n in m.nodes if n.op == "call_module"]
    with float64_modules(modules):
        for node, m in todo.items():
            module = build_module(m, node)
            err = check_replacement(traced, found, node, m, ctx.seed)
            rtol = max(ctx.rtol, 10 * torch.finfo(node.meta["tensor_meta"].dtype).eps)
            if err <= rtol:
                accepted.append((node, m, module, err))
            else:
                ctx.report.unfused.append((join(path, node.name), f"replacement failed its float64 check (rel "
                                           f"err {err:.1e} > {rtol:.0e}): left as it was"))
    return accepted


def _value_nodes(found, m: AffineMap) -> list:
    return [n for n in m.nodes if not graph_plan.is_identity(found.analysis, n)]


def _worth_fusing(found, m: AffineMap) -> bool:
    """A sub-graph with a weighted conv and something else to fold into it."""
    return m.weighted > 0 and len(_value_nodes(found, m)) > 1 and min(m.padding) >= 0


def _note_unfused(found, path: str, ctx: _Context) -> None:
    for node, why in found.refusals.items():
        ctx.report.unfused.append((join(path, node.name), why))
    for node, m in found.outputs.items():
        if m.kernel_ops == 0 and not m.identity and _value_nodes(found, m):
            ctx.report.unfused.append((join(path, node.name), f"{' + '.join(m.labels)}: no convolution to fold "
                                       f"into (it follows {m.root.name}, which is not affine)"))
