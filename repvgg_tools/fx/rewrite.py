"""Where the graph fuser's accepted sub-graphs go: each smallest module holding some gets a forward cut out of its
ancestor's trace and rewritten (:func:`extract_forward`, :func:`rewrite`), or its parent where it cannot be cut out,
and :func:`assemble` builds them into the model itself or into a copy that never copies the dropped branches."""

from __future__ import annotations

import copy
import functools
import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn

from . import match as graph_match
from .maps import AffineMap
from .plan import is_identity
from .trace import Traced, attribute

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
    return f"{path}.{name}" if path and name else path or name


def within(path: str, ancestor: str) -> bool:
    return not ancestor or path == ancestor or path.startswith(ancestor + ".")


def lca_of(m: AffineMap, found=None, out: fx.Node | None = None) -> str:
    """Path of the smallest module whose forward holds the sub-graph's operations and its output ``out`` (given
    the plan ``found``, identity ops such as an eval Dropout on the way in need no rewrite and do not count)."""
    nodes = [n for n in m.nodes if found is None or n is out or not is_identity(found.analysis, n)] or list(m.nodes)
    stacks = [graph_match.node_container(n) for n in nodes]
    common = stacks[0]
    for s in stacks[1:]:
        i = 0
        while i < min(len(common), len(s)) and common[i] == s[i]:
            i += 1
        common = common[:i]
    return common[-1] if common else ""


def plan_rewrites(module: nn.Module, traced: Traced, found, accepted: list, path: str, *, whole: bool,
                  report, training: bool) -> list[tuple[str, Callable]]:
    """Where the accepted ``(node, map, module, rel err)`` sub-graphs of ``traced`` (whose root is ``module``, at
    ``path`` in the model) go.

    - A plain chain of single-use module calls (a conv and the BN after it) is swapped module for module: the
      fused layer takes the conv's place and the others become ``nn.Identity`` (a BN's own activation stays), so
      no forward is rewritten and the model keeps its modules' names.
    - Any other sub-graph: the smallest module holding it gets a rewritten forward cut out of this trace, so the
      model keeps its class; where that cannot be, the next module up; at the top (or with ``whole``),
      ``module`` itself becomes the GraphModule. Chains inside such a module are rewritten with it.

    Returns:
        ``(path, build)`` pairs: ``build(fetch)`` makes the module that replaces the one at ``path`` (adding its
        :class:`FusedItem` entries to ``report.fused``), ``fetch`` giving what it holds of each module it keeps.
    """
    chains = {} if whole else _chains(traced, accepted)
    lca_by_node = {node: lca_of(m, found, node) for node, m, _, _ in accepted}
    regions = _regions(traced, found, {lca_by_node[node] for node, *_ in accepted if node not in chains}, accepted,
                       lca_by_node, whole)
    out = [(join(path, lca), functools.partial(
        rewrite, module.get_submodule(lca) if lca else module, graph, local, found,
        [a for a in accepted if within(lca_by_node[a[0]], lca)], join(path, lca), report, training,
        traced.constants, prefix=lca)) for lca, (graph, local) in regions.items()]
    for item in accepted:
        node = item[0]
        if node in chains and not any(within(lca_by_node[node], lca) for lca in regions):
            out += _swap_chain(traced, item, chains[node], path, join(path, lca_by_node[node]), report, training)
    return out


def _regions(traced: Traced, found, lcas: set, accepted: list, lca_by_node: dict, whole: bool) -> dict:
    """The modules to rewrite, ``{path: (graph, node map)}``: each of ``lcas`` whose forward can be cut out of the
    trace and reads the input of every accepted sub-graph it holds (chains included), else its parent;
    ``{"": (the traced graph, None)}`` where that reaches the top (or with ``whole``)."""
    if not lcas and not whole:
        return {}
    while True:
        outer = sorted(lca for lca in lcas if not any(o != lca and within(lca, o) for o in lcas))
        if "" in outer or whole:
            return {"": (traced.graph, None)}
        regions = {}
        for lca in outer:
            region = extract_forward(traced, lca)
            if region is not None and any(_entry(m, found, region[1]) is None for node, m, _, _ in accepted
                                          if within(lca_by_node[node], lca)):
                region = None  # a sub-graph's input is not among the values this forward sees
            if region is None:
                lcas = (lcas - {lca}) | {lca.rpartition(".")[0]}
                break
            regions[lca] = region
        else:
            return regions


def _chains(traced: Traced, accepted: list) -> dict:
    """``{output node: module targets in call order}`` for the accepted sub-graphs that are a plain chain of module
    calls (root -> m1 -> ... -> output, each intermediate read once), every module called once, registered once
    and with no tensor of it read elsewhere (DBB pads with its BN's shift), with a conv or linear among them."""
    calls = Counter(n.target for n in traced.node_list if n.op == "call_module")
    read = {n.target.rpartition(".")[0] for n in traced.node_list if n.op == "get_attr"}
    registered: Counter | None = None
    chains = {}
    for node, m, _, _ in accepted:
        chain, cur = [], node
        while isinstance(cur, fx.Node) and cur is not m.root and cur.op == "call_module" and len(cur.args) == 1 \
                and not cur.kwargs and (cur is node or len(cur.users) == 1):
            chain.append(cur)
            cur = cur.args[0]
        targets = [c.target for c in reversed(chain)]
        if cur is not m.root or set(chain) != set(m.nodes) or any(calls[t] != 1 or t in read for t in targets):
            continue
        if registered is None:
            registered = Counter(id(mod) for _, mod in traced.root.named_modules(remove_duplicate=False))
        mods = [traced.root.get_submodule(t) for t in targets]
        if all(registered[id(mod)] == 1 for mod in mods) and any(isinstance(mod, _WEIGHTED) for mod in mods):
            chains[node] = targets
    return chains


_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def _entry(m: AffineMap, found, local: dict | None) -> fx.Node | None:
    """The traced node whose value the replacement reads in a cut-out forward (``local`` maps the traced graph's
    nodes into it): the root, or where the root lies outside that forward, the first identity op after it (an eval
    Dropout the parent applies first) that lies inside; ``None`` if neither does."""
    if local is None or m.root in local:
        return m.root
    frontier, seen = [m.root], set()
    while frontier:
        for user in frontier.pop(0).users:
            if user in m.nodes and user not in seen and is_identity(found.analysis, user):
                if user in local:
                    return user
                seen.add(user)
                frontier.append(user)
    return None


def _swap_chain(traced: Traced, item: tuple, targets: list[str], path: str, where: str, report,
                training: bool) -> list[tuple[str, Callable]]:
    """Module-for-module replacements of one chain: its first conv or linear becomes the fused layer, the other
    modules ``nn.Identity`` (or, for a BN that applies its own activation, that activation)."""
    node, m, layer, err = item
    place = next(t for t in targets if isinstance(traced.root.get_submodule(t), _WEIGHTED))
    act = traced.root.get_submodule(m.post) if m.post is not None else None
    after = str(layer) + (f" + {type(act).__name__}" if act is not None else "")

    def fused(fetch: Callable) -> nn.Module:
        report.fused.append(FusedItem(where, node.name, [lbl for lbl in m.labels if lbl], after, err))
        return layer.train(training)

    def emptied(fetch: Callable, target: str) -> nn.Module:
        if act is not None and target == targets[-1]:
            return fetch(act)
        return nn.Identity().train(training)

    return [(join(path, t), fused if t == place else functools.partial(emptied, target=t)) for t in targets]


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
            new = graph.call_module(name, (replaced.get(m.root) or at(_entry(m, found, local)),))
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
