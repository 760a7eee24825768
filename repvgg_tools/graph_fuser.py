"""The graph fuser: reparameterize any network by reading its graph, no per-block method needed.

:func:`graph_fuse` traces a model with ``torch.fx``, finds every maximal affine sub-graph (convs, BatchNorms,
linears, average pools, constant pads, sums, differences, layer scales and concatenations that share one input and
end in one output; see :mod:`repvgg_tools.graph_match`), computes the single convolution each equals in float64,
checks it on random inputs against the original operations in float64, and only then swaps it in. The smallest
module whose ``forward`` contains a sub-graph is replaced by its rewritten ``torch.fx.GraphModule``, so the model
keeps its class and its other modules. A :class:`FuseReport` lists what was fused, what was not and why.
Untraceable modules are skipped with a warning (their children are tried one by one), never guessed.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import graph_match, graph_plan
from .graph_check import build_module, check_replacement
from .graph_maps import AffineMap

__all__ = ["FuseReport", "FusedItem", "graph_fuse", "example_inputs_for", "VERIFY_RTOL"]

log = logging.getLogger(__name__)

# float64 check of each replacement, max|a-b| / max|b|: this, or 10 ulp of the model's dtype if larger (constants a
# model computes itself, such as DBB's pad values, are exact to its own precision only)
VERIFY_RTOL = 1e-10
_LEAVES = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear, nn.modules.pooling._AvgPoolNd)


@dataclass
class FusedItem:
    """One replacement: ``before`` (the operations) became ``after`` (one module); ``max_rel`` from its check."""

    module: str
    node: str
    before: list[str]
    after: str
    max_rel: float


@dataclass
class FuseReport:
    """What :func:`graph_fuse` did: ``fused`` replacements, ``unfused`` (where, reason) pairs and ``skipped``
    (module, reason) pairs for modules that could not be traced."""

    fused: list[FusedItem] = field(default_factory=list)
    unfused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} sub-graphs, {len(self.unfused)} left unfused, "
                 f"{len(self.skipped)} modules not traced"]
        lines += [f"  fused {f.module or '<model>'}:{f.node}: {' + '.join(f.before)} -> {f.after} "
                  f"(rel err {f.max_rel:.1e})" for f in self.fused]
        lines += [f"  unfused {where}: {why}" for where, why in self.unfused]
        lines += [f"  not traced {where}: {why}" for where, why in self.skipped]
        return "\n".join(lines)


class FusionTracer(fx.Tracer):
    """Keeps convs, BatchNorms (timm's BatchNormAct2d included), linears and pools as leaves."""

    def __init__(self, leaves: tuple = ()) -> None:
        super().__init__()
        self.leaves = _LEAVES + tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        self._tensor_names: dict[int, str] | None = None
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        """fx's own ``getattr`` searches all of the root's parameters at every access (quadratic: most of the
        fuser's time on timm models); the same lookup through a name table built once per trace."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._tensor_names is None:
            names: dict[int, str] = {}
            for name, p in self.root.named_parameters():
                names.setdefault(id(p), name)
            if self.proxy_buffer_attributes:
                for name, b in self.root.named_buffers():
                    names.setdefault(id(b), name)
            self._tensor_names = names
        name = self._tensor_names.get(id(attr_val))
        if name is None or not (isinstance(attr_val, nn.Parameter) or self.proxy_buffer_attributes):
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


@dataclass
class _Context:
    inputs: dict
    report: FuseReport
    leaves: tuple
    rtol: float
    whole_model: bool = False
    top_graph: fx.Graph | None = None  # the model's graph, traced once already
    noted: list = field(default_factory=list)  # paths whose unfused sub-graphs are in the report
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
        inplace: modify ``model`` instead of a deep copy (replaced sub-modules are swapped in place; a model
            whose own ``forward`` holds a sub-graph is returned as a new GraphModule either way).
        leaf_modules: extra module classes the tracer must not enter (e.g. ones with data-dependent control flow).
        rtol: float64 tolerance of each replacement's check.
        whole_model: rewrite the traced model itself as one GraphModule (faster: one trace instead of one per
            fused module, but the model's class and methods give way to the GraphModule's ``forward``).

    Returns:
        ``(fused model, report)``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport()
    params = list(model.parameters()) + list(model.buffers())
    if any(p.is_meta for p in params):
        report.skipped.append(("<model>", "meta tensors hold no values to fuse or check"))
        return model, report
    modes, top_mode = {m: m.training for m in model.modules()}, model.training
    model.eval()
    try:
        top_graph = None
        try:  # nothing to fuse (a deployed network): skip the forward passes
            top_graph = FusionTracer(tuple(leaf_modules)).trace(model)
            nothing = not graph_plan.may_fuse(top_graph, model)
        except Exception:  # noqa: BLE001 - untraceable at the top: the children are tried below
            nothing = False
        inputs = None if nothing else _capture_inputs(model, example_inputs)
        if nothing:
            pass
        elif inputs is None:
            report.skipped.append(("<model>", "no example input: pass example_inputs"))
        else:
            ctx = _Context(inputs, report, tuple(leaf_modules), rtol, whole_model, top_graph)
            model = _fuse_module(model, "", ctx)
    finally:
        for m in model.modules():  # kept modules get their flags back; new ones take the model's
            m.training = modes.get(m, top_mode)
    _warn_left_in_untraced(model, report)
    log.info("graph fuser: %s", report)
    return model, report


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


def _capture_inputs(model: nn.Module, example_inputs: tuple | None) -> dict | None:
    """Run one forward and keep each module's first call arguments (for tracing shapes of sub-modules)."""
    if example_inputs is None:
        candidates = example_inputs_for(model)
    else:
        candidates = [example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)]
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
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        finally:
            for h in handles:
                h.remove()
    log.warning("graph fuser: the model did not run on an example input (%s); pass example_inputs",
                "; ".join(errors) or "no Conv2d or Linear to size one from")
    return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Traced:
    """A traced graph over its root module (no GraphModule is compiled until a rewrite needs one)."""

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        self.root, self.graph = root, graph

    def __getattr__(self, name: str):
        return getattr(self.root, name)


class _ShapeProp(ShapeProp):
    """ShapeProp over a root module and a graph (skips compiling a GraphModule just to propagate shapes)."""

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        fx.Interpreter.__init__(self, root, graph=graph)
        self.fake_module = self.fake_mode = None
        self.real_module = root


def _trace(module: nn.Module, args: tuple, kwargs: dict, leaves: tuple, graph: fx.Graph | None = None) -> _Traced:
    graph = graph if graph is not None else FusionTracer(leaves).trace(module)
    if kwargs:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        args = tuple(bound.arguments.values())
    _ShapeProp(module, graph).propagate(*args)
    return _Traced(module, graph)


def _fuse_module(module: nn.Module, path: str, ctx: _Context) -> nn.Module:
    captured = ctx.inputs.get(id(module))
    if captured is None:
        return module
    try:
        gm = _trace(module, *captured, ctx.leaves, None if path else ctx.top_graph)
    except Exception as exc:  # noqa: BLE001 - untraceable: skip it, try its children
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        ctx.report.skipped.append((path or type(module).__name__, reason))
        log.info("graph fuser: cannot trace %s (%s); trying its children", path or type(module).__name__, reason)
        for name, child in list(module.named_children()):
            new = _fuse_module(child, _join(path, name), ctx)
            if new is not child:
                setattr(module, name, new)
        return module
    found = graph_plan.plan(gm)
    todo = {n: m for n, m in found.outputs.items() if _worth_fusing(found, m)}
    if not any(p == "" or path == p or path.startswith(p + ".") for p in ctx.noted):  # once per traced region
        _note_unfused(found, path, ctx)
        ctx.noted.append(path)
    if not todo:
        return module
    lcas = {n: _lca(m) for n, m in todo.items()}
    if any(lca == "" for lca in lcas.values()) or (ctx.whole_model and not path):
        return _rewrite(gm, found, todo, path, ctx)
    done: list[str] = []
    for lca in sorted(set(lcas.values()), key=lambda p: p.count(".")):
        if any(lca == d or lca.startswith(d + ".") for d in done):
            continue
        done.append(lca)
        sub = module.get_submodule(lca)
        new = _fuse_module(sub, _join(path, lca), ctx)
        if new is not sub:
            parent, _, name = lca.rpartition(".")
            setattr(module.get_submodule(parent), name, new)
    return module


def _value_nodes(found, m: AffineMap) -> list:
    return [n for n in m.nodes if found.analysis.ops[n][0] != "unary" or found.analysis.ops[n][2].kind != "identity"]


def _worth_fusing(found, m: AffineMap) -> bool:
    """A sub-graph with a weighted conv and something else to fold into it."""
    return m.weighted > 0 and len(_value_nodes(found, m)) > 1


def _note_unfused(found, path: str, ctx: _Context) -> None:
    for node, why in found.refusals.items():
        ctx.report.unfused.append((_join(path, node.name), why))
    for node, m in found.outputs.items():
        if m.kernel_ops == 0 and not m.identity and _value_nodes(found, m):
            ctx.report.unfused.append((_join(path, node.name), f"{' + '.join(m.labels)}: no convolution to fold "
                                       f"into (it follows {m.root.name}, which is not affine)"))


def _lca(m: AffineMap) -> str:
    stacks = [graph_match.node_container(n) for n in m.nodes]
    common = stacks[0]
    for s in stacks[1:]:
        i = 0
        while i < min(len(common), len(s)) and common[i] == s[i]:
            i += 1
        common = common[:i]
    return common[-1] if common else ""


def _rewrite(traced: _Traced, found, todo: dict, path: str, ctx: _Context) -> fx.GraphModule:
    """Check each sub-graph in float64, then swap in its conv; identity-only chains are bypassed."""
    gm = traced
    graph = traced.graph
    accepted = []
    for node, m in todo.items():
        module = build_module(m, node)
        err = check_replacement(gm, found, node, m, ctx.seed)
        rtol = max(ctx.rtol, 10 * torch.finfo(node.meta["tensor_meta"].dtype).eps)
        if err <= rtol:
            accepted.append((node, m, module, err))
        else:
            ctx.report.unfused.append((_join(path, node.name), f"replacement failed its float64 check (rel err "
                                       f"{err:.1e} > {rtol:.0e}): left as it was"))
    gm = fx.GraphModule(traced.root, graph, type(traced.root).__name__)
    replaced: dict = {}  # a root that is itself replaced is read from its replacement
    for node, m, module, err in accepted:
        name = _unique(gm, f"fused_{node.name}")
        gm.add_module(name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, (replaced.get(m.root, m.root),))
            if m.post is not None:  # the activation a BN module applied inside itself, now on its own
                act_name = _unique(gm, f"{name}_act")
                gm.add_module(act_name, gm.get_submodule(m.post))
                new = graph.call_module(act_name, (new,))
        node.replace_all_uses_with(new)
        replaced[node] = new
        after = str(module) + (f" + {type(gm.get_submodule(m.post)).__name__}" if m.post is not None else "")
        ctx.report.fused.append(FusedItem(path, node.name, [lbl for lbl in m.labels if lbl], after, err))
    for node, m in found.outputs.items():  # identity-only chains (Identity, eval Dropout) read their root
        if m.identity and node.users and node not in todo:
            node.replace_all_uses_with(replaced.get(m.root, m.root))
    _drop_dead(graph)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _drop_dead(graph: fx.Graph) -> None:
    """Remove nodes nobody reads (in-place ops included: their results were replaced), keeping asserts/outputs."""
    changed = True
    while changed:
        changed = False
        for node in reversed(graph.nodes):
            if node.op in ("placeholder", "output") or node.users:
                continue
            if node.op == "call_function" and node.target is torch._assert:
                continue
            if node.op == "call_module" or node.op == "get_attr" or node.op in ("call_function", "call_method"):
                graph.erase_node(node)
                changed = True


def _unique(gm: nn.Module, name: str) -> str:
    base, i = name, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name
