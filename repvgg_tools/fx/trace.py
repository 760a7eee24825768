"""Tracing for the graph fuser: a torch.fx tracer that keeps convs, BatchNorms, linears and pools as leaves, records
every call of a non-leaf module (so a module's forward can be cut out of its ancestor's graph) and leaves the traced
model unchanged, and one forward pass that records the shape and dtype of every value."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import fx, nn

__all__ = ["FusionTracer", "ModuleCall", "Traced", "TensorMeta", "run_for_shapes", "propagate", "attribute"]

_LEAVES = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear, nn.modules.pooling._AvgPoolNd)


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
        self.calls: dict[str, ModuleCall | None] = {}
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
        self.calls[path] = None if path in self.calls else ModuleCall(args, kwargs, out, start, len(self.graph.nodes))
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
class ModuleCall:
    """One call of a non-leaf module in a trace: its arguments and result (proxies or constants) and the range
    ``[start, end)`` of the graph's nodes it created."""

    args: tuple
    kwargs: dict
    out: object
    start: int
    end: int


class Traced:
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


def run_for_shapes(root: nn.Module, graph: fx.Graph, args: tuple, modules: dict, constants: dict | None = None
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
                    else attribute(root, node.target)
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


def propagate(module: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict, modules: dict, constants: dict
               ) -> None:
    if kwargs:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        args = tuple(bound.arguments.values())
    with torch.no_grad():
        run_for_shapes(module, graph, args, modules, constants)


def attribute(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
