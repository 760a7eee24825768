"""The graph fuser: reparameterize any network by reading its graph, no per-block method needed.

:func:`graph_fuse` traces a model with ``torch.fx``, finds every maximal affine sub-graph (convs, BatchNorms,
linears, average pools, constant pads, sums, differences, layer scales and concatenations that share one input and
end in one output; see :mod:`repvgg_tools.graph_match`), computes the single convolution each equals in float64,
checks it on random inputs against the original operations in float64, and only then swaps it in. The model is
traced once; the smallest module whose ``forward`` contains a sub-graph is replaced by a ``torch.fx.GraphModule``
of its forward, cut out of that trace and rewritten, so the model keeps its class and its other modules. A
:class:`FuseReport` lists what was fused, what was not and why. Untraceable modules are skipped with a warning
(their children are tried one by one), never guessed.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import fx, nn

from . import graph_match, graph_plan
from .graph_check import build_module, check_replacement, float64_modules
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
        self.proxy_buffer_attributes = True  # a buffer read in a forward is a get_attr by its name, not a constant

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    def trace(self, root, concrete_args=None):
        """Trace ``root`` without changing it: the constants fx would store on it (tensors a forward creates) go to
        ``self.constants`` instead."""
        self._tensor_names: dict[int, str] | None = None
        self.calls: dict[str, _Call | None] = {}
        self.constants: dict[str, object] = {}
        before = set(vars(root)) if isinstance(root, nn.Module) else None
        try:
            return super().trace(root, concrete_args)
        finally:
            if before is not None:
                for name in [n for n in vars(root) if n not in before]:
                    self.constants[name] = vars(root).pop(name)

    def call_module(self, m: nn.Module, forward, args: tuple, kwargs: dict):
        """Also record each call of a non-leaf module (arguments, result, the nodes it created), so that a module's
        own forward can later be cut out of its ancestor's graph instead of tracing it again."""
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        start = len(self.graph.nodes)
        out = super().call_module(m, forward, args, kwargs)
        # a module called twice has no single region: None (it is then rewritten as part of its parent)
        self.calls[path] = None if path in self.calls else _Call(args, kwargs, out, start, len(self.graph.nodes))
        return out

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
class _Call:
    """One call of a non-leaf module in a trace: its arguments and result (proxies or constants) and the range
    ``[start, end)`` of the graph's nodes it created."""

    args: tuple
    kwargs: dict
    out: object
    start: int
    end: int


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
    replacements: list = field(default_factory=list)  # (path, build(fetch) -> module) for :func:`_assemble`
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
            whose own ``forward`` holds a sub-graph is returned as a new GraphModule either way). Without it,
            ``model`` is read but never changed, and only what the fused model keeps is copied.
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
    fused = _assemble(model, ctx.replacements, inplace)
    _warn_left_in_untraced(fused, report)
    log.info("graph fuser: %s", report)
    return fused, report


def _assemble(model: nn.Module, replacements: list, inplace: bool) -> nn.Module:
    """Build each rewritten module and put it in place: into ``model`` itself, or into a deep copy of it made
    with the rewritten modules already in the copy's memo (so the modules they drop are never copied)."""
    memo: dict = {}
    fetch = (lambda obj: obj) if inplace else (lambda obj: copy.deepcopy(obj, memo))
    result = model
    for path, build in replacements:
        new = build(fetch)
        if not path:
            result = new
        elif inplace:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, new)
        else:
            memo[id(model.get_submodule(path))] = new
    return result if inplace or result is not model else copy.deepcopy(model, memo)


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
            errors.append(_first_line(exc))
        finally:
            for h in handles:
                h.remove()
    _warn_no_input(errors)
    return None


def _warn_no_input(errors: list[str]) -> None:
    log.warning("graph fuser: the model did not run on an example input (%s); pass example_inputs",
                "; ".join(errors) or "no Conv2d or Linear to size one from")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _within(path: str, ancestor: str) -> bool:
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


class _Traced:
    """A traced, shape-propagated graph over its root module (no GraphModule is compiled until a rewrite needs
    one), with the module calls the tracer recorded."""

    def __init__(self, root: nn.Module, graph: fx.Graph, calls: dict, constants: dict | None = None) -> None:
        self.root, self.graph, self.calls, self.constants = root, graph, calls, constants or {}
        self.node_list = list(graph.nodes)

    def __getattr__(self, name: str):
        if name in self.__dict__.get("constants", {}):
            return self.constants[name]
        return getattr(self.root, name)


class TensorMeta(NamedTuple):
    """What the fuser reads of a node's value: its shape and dtype (``node.meta["tensor_meta"]``)."""

    shape: torch.Size
    dtype: torch.dtype


def _run_for_shapes(root: nn.Module, graph: fx.Graph, args: tuple, modules: dict, constants: dict | None = None
                    ) -> None:
    """Run ``graph`` over ``root`` once and record each tensor value's shape and dtype (plain convs give zeros of
    their output's shape instead of computing it). torch's ShapeProp also records strides, memory format and
    quantization, which the fuser does not read, needs a compiled GraphModule, and its interpreter costs a third
    more than this loop. Each value is dropped after its last use."""
    nodes = list(graph.nodes)
    last_use: dict[fx.Node, list] = {}
    seen: set = set()
    for node in reversed(nodes):
        for used in node.all_input_nodes:
            if used not in seen:
                seen.add(used)
                last_use.setdefault(node, []).append(used)
    env: dict = {}
    positional = iter(args)
    for node in nodes:
        op = node.op
        if op == "output":
            return
        if op == "placeholder":
            value = next(positional, node.args[0] if node.args else None)
        else:
            args_, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if op == "call_module":
                module = modules[node.target]
                value = _conv_shape_only(module, args_, kwargs)
                value = module(*args_, **kwargs) if value is None else value
            elif op == "call_function":
                value = node.target(*args_, **kwargs)
            elif op == "call_method":
                value = getattr(args_[0], node.target)(*args_[1:], **kwargs)
            else:
                value = constants[node.target] if constants and node.target in constants \
                    else _attribute(root, node.target)
        env[node] = value
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = TensorMeta(value.shape, value.dtype)
        for used in last_use.get(node, ()):
            del env[used]


def _conv_shape_only(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Zeros of the shape and dtype a plain Conv2d would return, where it surely would (the input fits the
    weight and nothing hooks the call); ``None`` where the conv must run. Only shapes are recorded, and the convs
    are most of a forward pass's cost."""
    if type(module).forward is not nn.Conv2d.forward or kwargs or len(args) != 1 or isinstance(module.padding, str) \
            or module._forward_hooks or module._forward_pre_hooks:
        return None
    x, w = args[0], module.weight
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != module.in_channels or x.dtype != w.dtype \
            or x.device != w.device:
        return None
    size = [(x.shape[2 + i] + 2 * module.padding[i] - module.dilation[i] * (module.kernel_size[i] - 1) - 1)
            // module.stride[i] + 1 for i in (0, 1)]
    return x.new_zeros(x.shape[0], module.out_channels, *size) if min(size) > 0 else None


def _propagate(module: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict, modules: dict, constants: dict
               ) -> None:
    if kwargs:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        args = tuple(bound.arguments.values())
    with torch.no_grad():
        _run_for_shapes(module, graph, args, modules, constants)


def _shapes(module: nn.Module, graph: fx.Graph, modules: dict, constants: dict, ctx: _Context) -> bool:
    """Shape-propagate ``module``'s graph: with its captured inputs, or at the top with each example in turn."""
    if ctx.inputs is not None:
        captured = ctx.inputs.get(id(module))
        if captured is None:  # not called by the model's forward
            return False
        _propagate(module, graph, *captured, modules, constants)
        return True
    errors = []
    for inputs in ctx.candidates:
        try:
            _propagate(module, graph, inputs, {}, modules, constants)
            return True
        except Exception as exc:  # noqa: BLE001 - a model that needs other inputs: try the next, then say so
            errors.append(_first_line(exc))
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
        reason = f"{type(exc).__name__}: {_first_line(exc)[:160] if str(exc) else ''}"
        ctx.report.skipped.append((path or type(module).__name__, reason))
        log.info("graph fuser: cannot trace %s (%s); trying its children", path or type(module).__name__, reason)
        if ctx.inputs is None:
            ctx.inputs = _capture_inputs(ctx.model, ctx.candidates) or {}
        for name, child in module.named_children():
            _fuse_module(child, _join(path, name), ctx)
        return
    traced = _Traced(module, graph, tracer.calls, tracer.constants)
    found = graph_plan.plan(traced, modules=modules)
    if not any(_within(path, p) for p in ctx.noted):  # once per traced region
        _note_unfused(found, path, ctx)
        ctx.noted.append(path)
    todo = {n: m for n, m in found.outputs.items() if _worth_fusing(found, m)}
    accepted = _accept(traced, found, todo, path, ctx) if todo else []
    if accepted:
        _place(module, traced, found, accepted, path, ctx)


def _accept(traced: _Traced, found, todo: dict, path: str, ctx: _Context) -> list[tuple]:
    """Build each sub-graph's module and check it against the original operations in float64; ``(node, map,
    module, rel err)`` of those within tolerance (the others go to the report)."""
    accepted = []
    modules = [traced.root.get_submodule(n.target) for m in todo.values() for n in m.nodes if n.op == "call_module"]
    with float64_modules(modules):
        for node, m in todo.items():
            module = build_module(m, node)
            err = check_replacement(traced, found, node, m, ctx.seed)
            rtol = max(ctx.rtol, 10 * torch.finfo(node.meta["tensor_meta"].dtype).eps)
            if err <= rtol:
                accepted.append((node, m, module, err))
            else:
                ctx.report.unfused.append((_join(path, node.name), f"replacement failed its float64 check (rel "
                                           f"err {err:.1e} > {rtol:.0e}): left as it was"))
    return accepted


def _place(module: nn.Module, traced: _Traced, found, accepted: list, path: str, ctx: _Context) -> None:
    """Plan where the accepted sub-graphs go: each smallest module holding some gets a rewritten forward (cut out
    of this trace), so the model keeps its class; where that cannot be, the next module up; at the top (or with
    ``whole_model``), ``module`` itself becomes the GraphModule."""
    lca_of = {node: _lca(m) for node, m, _, _ in accepted}
    lcas = set(lca_of.values())
    while True:
        outer = sorted(lca for lca in lcas if not any(o != lca and _within(lca, o) for o in lcas))
        if "" in outer or (ctx.whole_model and not path):
            ctx.replacements.append((path, functools.partial(
                _rewrite, traced.root, traced.graph, None, found, accepted, path, ctx, traced.constants)))
            return
        regions = {}
        for lca in outer:
            region = _extract(traced, lca)
            if region is None:
                lcas = (lcas - {lca}) | {lca.rpartition(".")[0]}
                break
            regions[lca] = region
        else:
            for lca, (graph, local) in regions.items():
                items = [a for a in accepted if _within(lca_of[a[0]], lca)]
                ctx.replacements.append((_join(path, lca), functools.partial(
                    _rewrite, module.get_submodule(lca), graph, local, found, items, _join(path, lca), ctx,
                    traced.constants, prefix=lca)))
            return


class _Outside(Exception):
    """A value the module's forward reads from outside its own arguments and attributes."""


def _extract(traced: _Traced, lca: str) -> tuple[fx.Graph, dict] | None:
    """Module ``lca``'s forward as a graph of its own, copied out of its ancestor's traced graph (no second trace),
    with the map from the ancestor's nodes to the copies. ``None`` where the copy would not be that forward: a
    module called more than once, arguments that are neither graph values nor the defaults, values read from
    outside its arguments and attributes, or intermediate values read outside it."""
    call = traced.calls.get(lca)
    module = traced.root.get_submodule(lca)
    if call is None:
        return None
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*call.args, **call.kwargs)
    except (TypeError, ValueError):
        return None
    graph, env = fx.Graph(), {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            if bound.arguments.get(name):
                return None
            continue
        placeholder = graph.placeholder(name, default_value=param.default)
        value = bound.arguments.get(name, param.default)
        if isinstance(value, fx.Proxy):
            env.setdefault(value.node, placeholder)
        elif not _same_constant(value, param.default):  # a constant the trace baked in: not this forward
            return None
    prefix, name_prefix = lca + ".", lca.replace(".", "_") + "_"

    def local(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr" and n.target.startswith(prefix):  # an attribute first read before this call
            env[n] = graph.get_attr(n.target[len(prefix):])
            return env[n]
        raise _Outside(n.name)

    region = traced.node_list[call.start:call.end]
    try:
        for node in region:
            target = node.target
            if node.op == "get_attr" and target in traced.constants:
                pass  # a constant of the trace: the rewrite takes it under the same name
            elif node.op in ("call_module", "get_attr"):
                if not target.startswith(prefix):
                    return None
                target = target[len(prefix):]
            elif node.op not in ("call_function", "call_method"):
                return None
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), local)
            name = node.name[len(name_prefix):] if node.name.startswith(name_prefix) else node.name
            env[node] = graph.create_node(node.op, target, args, kwargs, name=name, type_expr=node.type)
            env[node].meta = copy.copy(node.meta)
        if not _plain_output(call.out):
            return None
        outputs = fx.node.map_aggregate(call.out, lambda a: local(a.node) if isinstance(a, fx.Proxy) else a)
    except _Outside:
        return None
    inside = set(region)
    returned = {env[a.node] for a in _proxies(call.out)}
    for node in region:
        if node.op != "get_attr" and env[node] not in returned and any(u not in inside for u in node.users):
            return None  # an intermediate value the parent reads (an attribute side effect): not this forward
    graph.output(outputs)
    return graph, env


def _same_constant(value, default) -> bool:
    if value is default:
        return True
    if default is inspect.Parameter.empty or isinstance(value, torch.Tensor) or type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - not comparable: not the same
        return False


def _proxies(value) -> list:
    found: list = []
    fx.node.map_aggregate(value, lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return found


def _plain_output(value) -> bool:
    """Proxies, plain constants and tuples, lists and dicts of them (what a graph's output can hold)."""
    if isinstance(value, (fx.Proxy, int, float, bool, str, type(None))):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain_output(v) for v in value)
    if isinstance(value, dict):
        return all(_plain_output(v) for v in value.values())
    return False


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


def _rewrite(root: nn.Module, graph: fx.Graph, local: dict | None, found, accepted: list, path: str,
             ctx: _Context, constants: dict, fetch, prefix: str = "") -> fx.GraphModule:
    """``root`` as a GraphModule of ``graph`` with each accepted sub-graph replaced by its module; ``local`` maps
    the traced graph's nodes to ``graph``'s (``None``: the same graph), ``fetch`` gives what the GraphModule holds
    of each module it keeps (the module itself, or its copy). Identity-only chains are bypassed. The graph is
    rewritten first, so the GraphModule takes only what it still uses and compiles once."""
    def at(n: fx.Node) -> fx.Node:
        return n if local is None else local[n]

    added: dict[str, nn.Module] = {}

    def unique(name: str) -> str:
        base, i = name, 1
        while name in added or hasattr(root, name):
            name, i = f"{base}_{i}", i + 1
        return name

    replaced: dict = {}  # a root that is itself replaced is read from its replacement
    for node, m, module, err in accepted:
        target = at(node)
        name = unique(f"fused_{target.name}")
        added[name] = module
        module.train(ctx.top_mode)
        after = str(module)
        with graph.inserting_before(target):
            new = graph.call_module(name, (replaced.get(m.root) or at(m.root),))
            if m.post is not None:  # the activation a BN module applied inside itself, now on its own
                act = root.get_submodule(m.post[len(prefix) + 1:] if prefix else m.post)
                act_name = unique(f"{name}_act")
                added[act_name] = fetch(act)
                new = graph.call_module(act_name, (new,))
                after += f" + {type(act).__name__}"
        target.replace_all_uses_with(new)
        replaced[node] = new
        ctx.report.fused.append(FusedItem(path, target.name, [lbl for lbl in m.labels if lbl], after, err))
    done = {node for node, *_ in accepted}
    for node, m in found.outputs.items():  # identity-only chains (Identity, eval Dropout) read their root
        if m.identity and node not in done and (local is None or (node in local and m.root in local)):
            if at(node).users:
                at(node).replace_all_uses_with(replaced.get(m.root) or at(m.root))
    _drop_dead(graph)
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    gm = fx.GraphModule({t: added[t] if t in added else fetch(constants[t] if t in constants else
                                                              _attribute(root, t)) for t in used},
                        graph, type(root).__name__)
    gm.training = ctx.top_mode
    return gm


def _attribute(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
