"""Where the graph fuser's accepted sub-graphs go: each smallest module holding some gets a forward cut out of its
ancestor's trace and rewritten (:func:`extract_forward`, :func:`rewrite`), or its parent where it cannot be cut out,
and :func:`assemble` builds them into the model itself or into a copy that never copies the dropped branches."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from . import graph_match
from .graph_maps import AffineMap
from .graph_trace import Traced, attribute

__all__ = ["FusedItem", "plan_rewrites", "extract_forward", "rewrite", "assemble", "lca_of", "within", "join"]


@dataclass
class FusedItem:
    """One replacement: ``before`` (the operations) became ``after`` (one module); ``max_rel`` from its check."""

    module: str
    node: str
    before: list[str]
    after: str
    max_rel: float


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def within(path: str, ancestor: str) -> bool:
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def lca_of(m: AffineMap) -> str:
    stacks = [graph_match.node_container(n) for n in m.nodes]
    common = stacks[0]
    for s in stacks[1:]:
        i = 0
        while i < min(len(common), len(s)) and common[i] == s[i]:
            i += 1
        common = common[:i]
    return common[-1] if common else ""


def plan_rewrites(module: nn.Module, traced: Traced, found, accepted: list, path: str, *, whole: bool,
                  report, training: bool) -> list[tuple[str, Callable]]:
    """Where the accepted ``(node, map, module, rel err)`` sub-graphs of ``traced`` go: each smallest module holding
    some gets a rewritten forward (cut out of this trace), so the model keeps its class; where that cannot be, the
    next module up; at the top (or with ``whole``), ``module`` itself becomes the GraphModule.

    Returns:
        ``(path, build)`` pairs: ``build(fetch)`` makes the module that replaces the one at ``path`` (adding its
        :class:`FusedItem` entries to ``report.fused``), ``fetch`` giving what it holds of each module it keeps.
    """
    lca_by_node = {node: lca_of(m) for node, m, _, _ in accepted}
    lcas = set(lca_by_node.values())
    while True:
        outer = sorted(lca for lca in lcas if not any(o != lca and within(lca, o) for o in lcas))
        if "" in outer or whole:
            return [(path, functools.partial(rewrite, traced.root, traced.graph, None, found, accepted, path, report,
                                             training, traced.constants))]
        regions = {}
        for lca in outer:
            region = extract_forward(traced, lca)
            if region is None:
                lcas = (lcas - {lca}) | {lca.rpartition(".")[0]}
                break
            regions[lca] = region
        else:
            return [(join(path, lca), functools.partial(
                rewrite, module.get_submodule(lca), graph, local, found,
                [a for a in accepted if within(lca_by_node[a[0]], lca)], join(path, lca), report, training,
                traced.constants, prefix=lca)) for lca, (graph, local) in regions.items()]


class _Outside(Exception):
    """A value the module's forward reads from outside its own arguments and attributes."""


def extract_forward(traced: Traced, lca: str) -> tuple[fx.Graph, dict] | None:
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


def rewrite(root: nn.Module, graph: fx.Graph, local: dict | None, found, accepted: list, path: str, report,
            training: bool, constants: dict, fetch: Callable, prefix: str = "") -> fx.GraphModule:
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
    by_origin: dict[frozenset, str] = {}
    for node, m, module, err in accepted:
        target = at(node)
        # a module called twice (its parent rewritten) gives the same conv twice, from the same modules: keep one
        origin = frozenset(n.target for n in m.nodes if n.op == "call_module")
        name = by_origin.get(origin)
        if name is None or not _same_layer(added[name], module):
            name = unique(f"fused_{target.name}")
            added[name] = module
            by_origin.setdefault(origin, name)
            module.train(training)
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
        report.fused.append(FusedItem(path, target.name, [lbl for lbl in m.labels if lbl], after, err))
    done = {node for node, *_ in accepted}
    for node, m in found.outputs.items():  # identity-only chains (Identity, eval Dropout) read their root
        if m.identity and node not in done and (local is None or (node in local and m.root in local)):
            if at(node).users:
                at(node).replace_all_uses_with(replaced.get(m.root) or at(m.root))
    _drop_dead(graph)
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    gm = fx.GraphModule({t: added[t] if t in added else fetch(constants[t] if t in constants else
                                                              attribute(root, t)) for t in used},
                        graph, type(root).__name__)
    gm.training = training
    return gm


def _same_layer(a: nn.Module, b: nn.Module) -> bool:
    """Two fused layers that compute the same function: same class and settings, equal weights and biases."""
    if type(a) is not type(b) or not isinstance(a, (nn.Conv2d, nn.Linear)) or str(a) != str(b):
        return False
    return torch.equal(a.weight, b.weight) and (a.bias is None) == (b.bias is None) and \
        (a.bias is None or torch.equal(a.bias, b.bias))


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


def assemble(model: nn.Module, replacements: list, inplace: bool) -> nn.Module:
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
