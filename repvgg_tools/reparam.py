"""``reparameterize``: turn any model into its plain form (blocks' own methods, Conv->BN folds, the graph fuser)."""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter

import torch
from torch import nn

from .blocks import conv_bn_kernel_bias
from .fx.fuser import FuseReport, graph_fuse
from .fx.trace import FusionTracer

__all__ = ["reparameterize", "fold_conv_bn", "call_deploy_methods", "METHOD_NAMES"]

log = logging.getLogger(__name__)

# ids of the modules whose own ``reparameterize()`` is running: a block (or a user's model) whose method calls
# back into :func:`reparameterize` with itself must not be called again
_ACTIVE: set[int] = set()


METHOD_NAMES = ("reparameterize", "switch_to_deploy", "fuse")  # ours and timm; official, MMPretrain, YOLOv6; timm


def reparameterize(
    model: nn.Module, inplace: bool = False, *, methods: bool = True, graph: bool = True,
    example_inputs: tuple | None = None, report: bool = False,
) -> nn.Module | tuple[nn.Module, FuseReport]:
    """Return the deploy form of ``model``: every re-parameterizable structure fused into plain convolutions.

    Three steps, each exact and each skipping what it cannot handle:

    1. Blocks' own conversion methods (``methods``): ``reparameterize()`` (ours, timm), ``switch_to_deploy()`` (the
       official RepVGG/DBB code, MMPretrain, YOLOv6) or ``fuse()`` (timm's RepViT/EfficientViT: a returned module
       replaces the block), called top-down on the first module of a branch that has one and takes no required
       argument; its children are then left to it. Modules of torch itself are never called.
    2. Conv2d->BatchNorm2d folding: inside an ``nn.Sequential`` the BN entry is removed (index-named entries are
       renumbered, so ``vgg16_bn`` becomes exactly the ``vgg16`` layout); elsewhere pairs found by tracing with
       ``torch.fx`` fold and the BN becomes ``nn.Identity`` (only a BN that nothing else reads).
    3. The graph fuser (``graph``, :func:`repvgg_tools.fx.fuser.graph_fuse`): every remaining linear sub-graph
       (branch sums, BN-only and identity branches, 1x1->kxk chains, average pools, layer scales...) becomes the
       single conv it equals, each checked in float64 before it is swapped in; blocks without any method fuse too.

    Idempotent; works in any dtype and on any device.

    Args:
        model: the training-form model. BatchNorm running statistics are used, as in eval mode.
        inplace: modify ``model`` itself instead of a deep copy (a model whose own ``forward`` holds a fused
            sub-graph is returned as a new GraphModule even then).
        methods: call the blocks' own methods first (``False``: the graph fuser alone).
        graph: run the graph fuser.
        example_inputs: inputs of one forward call for the graph fuser (default: a 64x64 image sized from the first
            Conv2d).
        report: also return the graph fuser's :class:`~repvgg_tools.fx.fuser.FuseReport`.

    Returns:
        The re-parameterized model (``model`` itself when ``inplace``, unless replaced), or ``(model, report)``.
    """
    if model.training:
        log.warning(
            "model is in train mode: converting with BatchNorm running statistics; call .eval() before comparing "
            "outputs, since train-mode BatchNorm uses batch statistics"
        )
    if not inplace:
        model = copy.deepcopy(model)
    blocks = call_deploy_methods(model) if methods else 0
    folded = fold_conv_bn(model)
    fuse_report = FuseReport()
    if graph:
        model, fuse_report = graph_fuse(model, example_inputs, inplace=True)
    log.info("reparameterized %d blocks by their methods, folded %d Conv2d->BatchNorm2d pairs, fused %d sub-graphs",
             blocks, folded, len(fuse_report.fused))
    return (model, fuse_report) if report else model


def _deploy_method(module: nn.Module):
    """The first of :data:`METHOD_NAMES` that ``module`` defines outside torch and can call without arguments."""
    if type(module).__module__.startswith("torch."):
        return None, None
    for name in METHOD_NAMES:
        method = getattr(module, name, None)
        if not callable(method) or isinstance(method, nn.Module):
            continue
        try:
            params = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):
            continue
        if any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               for p in params):
            log.debug("%s.%s takes required arguments: not called", type(module).__name__, name)
            continue
        return name, method
    return None, None


def call_deploy_methods(model: nn.Module) -> int:
    """Call the blocks' own deploy methods (see :func:`reparameterize`), top-down, in place.

    Returns:
        The number of methods called on modules not already deployed.
    """
    called = 0

    def visit(module: nn.Module, parent: nn.Module | None, attr: str) -> None:
        nonlocal called
        name, method = (None, None) if id(module) in _ACTIVE else _deploy_method(module)
        if method is None:
            for child_name, child in list(module.named_children()):
                visit(child, module, child_name)
            return
        if not getattr(module, "is_deployed", False):
            called += 1
        _ACTIVE.add(id(module))
        try:
            result = method()
        finally:
            _ACTIVE.discard(id(module))
        if name == "fuse" and isinstance(result, nn.Module) and result is not module and parent is not None:
            setattr(parent, attr, result)  # timm's convention: fuse() returns the replacement

    visit(model, None, "")
    return called


@torch.no_grad()
def _fuse_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    kernel, bias = conv_bn_kernel_bias(conv, bn)
    conv.weight.copy_(kernel)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias)
    else:
        conv.bias.copy_(bias)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
        and bn.num_features == conv.out_channels
    )


def fold_conv_bn(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv, in place.

    Returns:
        The number of folded pairs.
    """
    folded = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        items = list(seq._modules.items())
        kept, i = [], 0
        while i < len(items):
            kept.append(items[i])
            if i + 1 < len(items) and _foldable(items[i][1], items[i + 1][1]):
                _fuse_into_conv(items[i][1], items[i + 1][1])
                folded += 1
                i += 1
            i += 1
        if len(kept) != len(items):
            numbered = all(name.isdigit() for name, _ in items)
            for name, _ in items:
                del seq._modules[name]
            for j, (name, module) in enumerate(kept):
                seq.add_module(str(j) if numbered else name, module)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        folded += _fold_traced(model)
    return folded


def _fold_traced(model: nn.Module) -> int:
    """Fold the Conv2d->BatchNorm2d pairs that are not neighbours in a Sequential, found by tracing with torch.fx."""
    try:
        graph = FusionTracer().trace(model)  # convs and BatchNorms as leaves, parameters looked up once
    except Exception as exc:  # models with data-dependent control flow do not trace
        log.warning("could not trace %s (%s): BatchNorms outside nn.Sequential stay unfolded",
                    type(model).__name__, exc)
        return 0
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    # a BN whose tensors the code also reads (DBB pads with its shift) must stay a BN
    read = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1 \
                or node.target in read:
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if not _foldable(conv, bn):
            continue
        _fuse_into_conv(conv, bn)
        parent_name, _, attr = node.target.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, nn.Identity())
        folded += 1
    return folded
