"""Affine analysis of a torch.fx graph: which nodes are affine maps of which input, composed into one convolution.

Each node gets an :class:`AffineMap`: ``node = conv(root; kernel, stride, padding, dilation, groups) + bias``
where ``root`` is the nearest non-affine node (or a cut). Unary affine ops (Conv2d, BatchNorm, Linear, AvgPool2d,
constant pad, scale, bias, identity) compose sequentially; add, subtract and channel concatenation merge maps that
share a root. Compositions that are not exact (a padded conv after a non-zero bias, branches whose centres do not
align) or that would cost more than the operations they replace are refused: the input becomes a cut and a new map
starts from it. :func:`repvgg_tools.fx.plan.plan` picks the nodes to materialize as single convolutions. The
map algebra is :mod:`repvgg_tools.fx.maps` (its math :mod:`repvgg_tools.fusion.ops`);
:mod:`repvgg_tools.fx.fuser` drives the fuse, :mod:`repvgg_tools.fx.trace` traces,
:mod:`repvgg_tools.fx.check` verifies and :mod:`repvgg_tools.fx.rewrite` rewrites.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..fusion import ops
from ..fusion.core import fuse_bn
from .maps import AffineMap, Op, Refused, apply_op, as_pair, evolve, merge_cat, merge_sum

__all__ = ["AffineMap", "Op", "Analysis", "node_container"]

_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_CAT = {torch.cat, torch.concat}
_IDENTITY_METHODS = {"contiguous", "clone"}
_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, "add_", "sub_", "mul_", "div_"}
_DROPOUTS = (nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.AlphaDropout)
_BN_FORWARDS = {nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.modules.batchnorm._BatchNorm.forward}


def _meta(node) -> tuple | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return (tuple(tm.shape), tm.dtype) if tm is not None and hasattr(tm, "shape") else None


def node_container(node: fx.Node) -> list[str]:
    """Paths of the modules whose ``forward`` contains ``node`` (outermost first), from the tracer's module stack."""
    paths = [v[0] if isinstance(v, tuple) else k for k, v in node.meta.get("nn_module_stack", {}).items()]
    return paths[:-1] if node.op == "call_module" else paths


class Analysis:
    """Constant folding, op classification and affine maps over one traced, shape-propagated GraphModule."""

    def __init__(self, gm, modules: dict | None = None) -> None:
        self.gm = gm
        first = next(gm.parameters(), None)
        first = first if first is not None else next(gm.buffers(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.consts: dict[fx.Node, object] = {}
        self.ops: dict[fx.Node, tuple] = {}
        self.refusals: dict[fx.Node, str] = {}
        self.modules = modules if modules is not None else dict(gm.named_modules())
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        for node in gm.graph.nodes:
            self._fold_constant(node)
            if node not in self.consts:
                self.ops[node] = self._classify(node)

    # ---- constants --------------------------------------------------------------------------------------
    def _fold_constant(self, node: fx.Node) -> None:
        """Evaluate in float64 the nodes that depend only on parameters, buffers and literals."""
        if node.op == "get_attr":
            self.consts[node] = _as64(_fetch(self.gm, node.target))
            return
        if node.op not in ("call_function", "call_method") or node.target is torch._assert:
            return
        inputs = node.all_input_nodes
        if not inputs or not all(n in self.consts for n in inputs):
            return
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.consts[n])
        try:
            if node.op == "call_function":
                self.consts[node] = node.target(*args, **kwargs)
            else:
                self.consts[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception:  # noqa: BLE001 - not a constant we can evaluate: leave it to the graph
            return

    def const(self, arg) -> Tensor | None:
        if isinstance(arg, fx.Node):
            value = self.consts.get(arg)
            return value if isinstance(value, Tensor) else (torch.tensor(float(value), dtype=torch.float64)
                                                             if isinstance(value, (int, float)) else None)
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return torch.tensor(float(arg), dtype=torch.float64)
        return None

    # ---- classification ---------------------------------------------------------------------------------
    def _classify(self, node: fx.Node) -> tuple | None:
        """``(kind, inputs, payload)``: ``("unary", x, Op)``, ``("sum", [(x, sign), ...])``, ``("cat", [x, ...])``;
        ``None`` for a node that is not affine in one tensor."""
        try:
            if node.op == "call_module":
                return self._classify_module(node, self.modules[node.target])
            if node.op in ("call_function", "call_method"):
                return self._classify_function(node)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            return None
        return None

    def _channels(self, node: fx.Node) -> tuple[int, int] | None:
        meta = _meta(node)
        if meta is None or len(meta[0]) not in (2, 4) or not meta[1].is_floating_point:
            return None
        return meta[0][1], len(meta[0])

    def _classify_module(self, node, m: nn.Module) -> tuple | None:
        if not node.args or node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
            return None
        x = node.args[0]
        info = self._channels(x)
        if info is None:
            return None
        c, rank = info
        label = f"{type(m).__name__} {node.target}"
        if isinstance(m, nn.Identity) or (isinstance(m, _DROPOUTS) and not m.training):
            return ("unary", x, Op("identity", label=label))
        if type(m).forward is nn.Conv2d.forward and rank == 4 and m.padding_mode == "zeros" \
                and not isinstance(m.padding, str):
            # the kernel as it is: maps convert it to float64 only where they compose it (most convs stand alone)
            return ("unary", x, Op("conv", m.weight.detach(), _bias64(m.bias, m.out_channels, m.weight),
                                   as_pair(m.stride), as_pair(m.padding), as_pair(m.dilation), m.groups, label))
        if type(m).forward is nn.Linear.forward and rank == 2:
            return ("unary", x, Op("conv", m.weight.detach()[:, :, None, None],
                                   _bias64(m.bias, m.out_features, m.weight), label=label))
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.running_mean is not None \
                and (rank == 4) == (not isinstance(m, nn.BatchNorm1d)):
            # a BN subclass (timm's BatchNormAct2d) is read as BN -> its one torch activation child, if it has one
            others = [(n, ch) for n, ch in m.named_children() if not isinstance(ch, (nn.Identity, *_DROPOUTS))]
            act = others[0] if len(others) == 1 and type(others[0][1]).__module__ == nn.ReLU.__module__ else None
            if type(m).forward in _BN_FORWARDS or not others or act is not None:
                scale, shift = fuse_bn(m.running_mean, m.running_var, m.eps, m.weight, m.bias)
                op = _diag(scale, shift, label)
                op.post = f"{node.target}.{act[0]}" if act is not None and type(m).forward not in _BN_FORWARDS \
                    else None
                return ("unary", x, op)
        if type(m) is nn.AvgPool2d and rank == 4 and m.count_include_pad and not m.ceil_mode \
                and m.divisor_override is None:
            return ("unary", x, _avg_op(c, m.kernel_size, m.stride, m.padding, label, self.device))
        return None

    def _classify_function(self, node) -> tuple | None:
        t, args, kw = node.target, node.args, node.kwargs
        if t in _IN_PLACE and not (isinstance(args[0], fx.Node) and len(args[0].users) == 1):
            return None  # the mutated tensor is read elsewhere too: values depend on execution order
        if t in _ADD or t in _SUB:
            if kw.get("alpha", 1) != 1:
                return None
            a, b = args[0], args[1]
            sign = -1.0 if t in _SUB else 1.0
            ca, cb = self.const(a), self.const(b)
            if ca is None and cb is None:
                return ("sum", [(a, 1.0), (b, sign)])
            x, c = (a, cb * sign) if cb is not None else (b, ca)
            if ca is not None and sign < 0:  # const - x
                return self._scaled_unary(b, -1.0, ca, f"{node.name}")
            return self._scaled_unary(x, 1.0, c, node.name)
        if t in _MUL:
            ca, cb = self.const(args[0]), self.const(args[1])
            if (ca is None) == (cb is None):
                return None
            return self._scaled_unary(args[1] if ca is not None else args[0], ca if ca is not None else cb, 0.0,
                                      node.name)
        if t in _DIV:
            cb = self.const(args[1])
            if cb is None or kw.get("rounding_mode") is not None:
                return None
            return self._scaled_unary(args[0], 1.0 / cb, 0.0, node.name)
        if t in _CAT:
            tensors = args[0] if args else kw["tensors"]
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            rank = self._channels(tensors[0])
            if rank is None or dim not in (1, 1 - rank[1]) or not all(isinstance(n, fx.Node) for n in tensors):
                return None
            return ("cat", list(tensors))
        if t in _IDENTITY_METHODS and len(args) == 1 and not kw:
            return ("unary", args[0], Op("identity", label=node.name))
        if t is F.dropout and (args[2] if len(args) > 2 else kw.get("training", True)) is False:
            return ("unary", args[0], Op("identity", label=node.name))
        if t is F.pad:
            return self._pad(node)
        if t is operator.getitem:
            return self._crop(node)
        if t is F.batch_norm:
            return self._functional_bn(node)
        if t is F.conv2d or t is F.linear:
            return self._functional_conv(node)
        if t is F.avg_pool2d:
            names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            p = dict(zip(names, args, strict=False)) | dict(kw)
            if p.get("ceil_mode", False) or not p.get("count_include_pad", True) or p.get("divisor_override"):
                return None
            info = self._channels(p["input"])
            if info is None or info[1] != 4:
                return None
            return ("unary", p["input"], _avg_op(info[0], p["kernel_size"], p.get("stride") or p["kernel_size"],
                                                 p.get("padding", 0), node.name, self.device))
        return None

    def _scaled_unary(self, x, scale, shift, label) -> tuple | None:
        info = self._channels(x) if isinstance(x, fx.Node) else None
        if info is None:
            return None
        c, rank = info
        scale, shift = _per_channel(scale, c, rank), _per_channel(shift, c, rank)
        if scale is None or shift is None:
            return None
        scale, shift = scale.to(self.device), shift.to(self.device)
        return ("unary", x, _diag(scale, shift, label))

    def _pad(self, node) -> tuple | None:
        args, kw = node.args, node.kwargs
        x, pad = args[0], args[1] if len(args) > 1 else kw["pad"]
        mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
        value = args[3] if len(args) > 3 else kw.get("value", None)
        info = self._channels(x)
        if mode != "constant" or info is None or info[1] != 4 or len(pad) != 4 or pad[0] != pad[1] \
                or pad[2] != pad[3] or min(pad) < 0:
            return None
        c = info[0]
        fill = torch.full((c,), float(value or 0.0), dtype=torch.float64, device=self.device)
        # pad values a model computes are exact to its own precision only (fx bakes some in as constants)
        tol = 64 * torch.finfo(_meta(x)[1]).eps
        return ("unary", x, Op("pad", bias=fill, padding=(pad[2], pad[0]), label=node.name, tol=tol))

    def _crop(self, node) -> tuple | None:
        """``x[:, :, a:-a, b:-b]`` (symmetric, step 1) as a crop; other indexing is not one conv."""
        x, idx = node.args
        meta = _meta(x)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if meta is None or len(meta[0]) != 4 or idx.count(Ellipsis) > 1:
            return None
        if Ellipsis in idx:
            at = idx.index(Ellipsis)
            idx = idx[:at] + (slice(None),) * (5 - len(idx)) + idx[at + 1:]
        idx = idx + (slice(None),) * (4 - len(idx))
        if len(idx) != 4 or not all(isinstance(s, slice) and all(v is None or type(v) is int
                                                                  for v in (s.start, s.stop, s.step)) for s in idx):
            return None
        cuts = []
        for s, n in zip(idx, meta[0], strict=True):
            start, stop, step = s.indices(n)
            if step != 1 or stop <= start or start != n - stop:
                return None
            cuts.append(start)
        if cuts[0] or cuts[1]:
            return None
        return ("unary", x, Op("crop", padding=(cuts[2], cuts[3]), label=node.name))

    def _functional_bn(self, node) -> tuple | None:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        p = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        if p.get("training", False) is not False:
            return None
        mean, var = self.const(p["running_mean"]), self.const(p["running_var"])
        if mean is None or var is None:
            return None
        w = self.const(p["weight"]) if p.get("weight") is not None else None
        b = self.const(p["bias"]) if p.get("bias") is not None else None
        scale, shift = fuse_bn(mean, var, float(p.get("eps", 1e-5)), w, b)
        return ("unary", p["input"], _diag(scale, shift, node.name))

    def _functional_conv(self, node) -> tuple | None:
        linear = node.target is F.linear
        names = ("input", "weight", "bias") + (() if linear else ("stride", "padding", "dilation", "groups"))
        p = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        w = self.const(p["weight"])
        info = self._channels(p["input"])
        if w is None or info is None or isinstance(p.get("padding", 0), str) or info[1] != (2 if linear else 4):
            return None
        b = self.const(p["bias"]) if p.get("bias") is not None else None
        b = b if b is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if linear:
            return ("unary", p["input"], Op("conv", w[:, :, None, None], b, label=node.name))
        return ("unary", p["input"], Op("conv", w, b, as_pair(p.get("stride", 1)), as_pair(p.get("padding", 0)),
                                        as_pair(p.get("dilation", 1)), int(p.get("groups", 1)), node.name))

    # ---- maps -------------------------------------------------------------------------------------------
    def identity(self, node: fx.Node) -> AffineMap | None:
        info = self._channels(node)
        if info is None:
            return None
        c, rank = info
        dd = {"dtype": torch.float64, "device": self.device}
        return AffineMap(node, torch.ones(c, 1, 1, 1, **dd), torch.zeros(c, **dd),
                         (1, 1), (0, 0), (1, 1), c, rank)

    def maps(self, cuts: set, previous: dict | None = None, before: set | None = None) -> dict:
        """Affine map of every affine node, roots at non-affine nodes and ``cuts``; refused joins add cuts.

        ``previous`` (the maps computed with the cuts ``before``) is reused for every node whose inputs neither
        gained a cut nor changed since: a pass that adds a few cuts recomputes only what lies after them."""
        vals: dict[fx.Node, AffineMap] = {}
        changed: set = set()

        def base(x) -> AffineMap | None:
            if not isinstance(x, fx.Node) or x in self.consts:
                return None
            if x in vals and x not in cuts and vals[x].post is None:
                return vals[x]
            return self.identity(x)

        for node in self.gm.graph.nodes:
            entry = self.ops.get(node)
            if entry is None:
                continue
            if previous is not None:
                inputs = [entry[1]] if entry[0] == "unary" else [x for x, *_ in entry[1]] if entry[0] == "sum" \
                    else entry[1]
                if not any(x in changed or (x in cuts and x not in before) for x in inputs):
                    if node in previous:
                        vals[node] = previous[node]
                    continue
            changed.add(node)
            try:
                if entry[0] == "unary":
                    x, op = entry[1], entry[2]
                    start = base(x)
                    if start is None:
                        continue
                    try:
                        vals[node] = self._absorb(apply_op(start, op), node)
                    except Refused as why:
                        if start.root is x:
                            raise
                        cuts.add(x)
                        self.refusals[x] = str(why)
                        vals[node] = self._absorb(apply_op(self.identity(x), op), node)
                    if op.post is not None:  # an activation closes the map: its users read the node
                        vals[node] = evolve(vals[node], post=op.post)
                elif entry[0] == "sum":
                    (a, sa), (b, sb) = entry[1]
                    ma, mb = base(a), base(b)
                    if ma is None or mb is None:
                        continue
                    if ma.root is not mb.root:  # x + f(x): the plain operand is the root of the other
                        ma, mb = (self.identity(a), mb) if mb.root is a else (ma, self.identity(b))
                    if ma.root is not mb.root:
                        continue
                    vals[node] = self._absorb(merge_sum(ma, mb, sa, sb), node)
                else:
                    parts = [base(x) for x in entry[1]]
                    if any(p is None for p in parts) or len({id(p.root) for p in parts}) != 1:
                        continue
                    vals[node] = self._absorb(merge_cat(parts), node)
            except Refused as why:
                self.refusals[node] = str(why)
        return vals

    @staticmethod
    def _absorb(m: AffineMap, node: fx.Node) -> AffineMap:
        return evolve(m, nodes=m.nodes | {node})


def _as64(t):
    return t.detach().to(torch.float64) if isinstance(t, Tensor) and t.is_floating_point() else t


def _bias64(bias, n, like) -> Tensor:
    return _as64(bias) if bias is not None else torch.zeros(n, dtype=torch.float64, device=like.device)


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _per_channel(value, c: int, rank: int) -> Tensor | None:
    t = value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    t = t.to(torch.float64)
    if t.numel() == 1 and t.dim() <= rank:
        return t.reshape(1).expand(c).clone()
    shape = tuple(t.shape)
    while shape and shape[0] == 1 and len(shape) > 1:
        shape = shape[1:]
    ok = shape == (c,) if rank == 2 else shape in ((c, 1, 1),)
    return t.reshape(c) if ok and t.dim() <= rank else None


def _diag(scale: Tensor, shift: Tensor, label: str) -> Op:
    return Op("diag", scale.reshape(-1, 1, 1, 1), shift, groups=scale.numel(), label=label)


def _avg_op(c: int, k, stride, padding, label: str, device) -> Op:
    k = as_pair(k)
    return Op("conv", ops.avg_pool_kernel(c, k, device=device), torch.zeros(c, dtype=torch.float64, device=device),
              as_pair(stride),
              as_pair(padding), (1, 1), c, label, weighted=0)
