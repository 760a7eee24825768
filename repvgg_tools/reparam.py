"""``reparameterize``: turn any model that contains our blocks or Conv2d->BatchNorm2d pairs into its plain form."""

from __future__ import annotations

import copy
import logging
from collections import Counter

import torch
from torch import nn

from .blocks import conv_bn_kernel_bias

__all__ = ["reparameterize", "fold_conv_bn"]

log = logging.getLogger(__name__)

# ids of the modules whose own ``reparameterize()`` is running: a block (or a user's model) whose method calls
# back into :func:`reparameterize` with itself must not be called again
_ACTIVE: set[int] = set()


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the deploy form of ``model``: every re-parameterizable block fused, every Conv2d->BatchNorm2d folded.

    Blocks are any module with a ``reparameterize()`` method (our :class:`~repvgg_tools.blocks.RepVGGBlock`), ``model``
    itself included. BatchNorms are folded where they directly follow a Conv2d: inside an ``nn.Sequential`` the BN
    entry is removed (index-named entries are renumbered, so ``vgg16_bn`` becomes exactly the ``vgg16`` layout; other
    names are kept); elsewhere the pair is found by tracing with ``torch.fx`` and the BN is replaced by
    ``nn.Identity``. Idempotent; works in any dtype and on any device.

    Args:
        model: the training-form model. BatchNorm running statistics are used, as in eval mode.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The re-parameterized model (``model`` itself when ``inplace``).
    """
    if model.training:
        log.warning(
            "model is in train mode: converting with BatchNorm running statistics; call .eval() before comparing "
            "outputs, since train-mode BatchNorm uses batch statistics"
        )
    if not inplace:
        model = copy.deepcopy(model)
    blocks = 0
    for module in list(model.modules()):
        if id(module) in _ACTIVE or not callable(getattr(module, "reparameterize", None)):
            continue
        if not getattr(module, "is_deployed", False):
            blocks += 1
        _ACTIVE.add(id(module))
        try:
            module.reparameterize()
        finally:
            _ACTIVE.discard(id(module))
    folded = fold_conv_bn(model)
    log.info("reparameterized %d blocks and folded %d Conv2d->BatchNorm2d pairs", blocks, folded)
    return model


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
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # models with data-dependent control flow do not trace
        log.warning("could not trace %s (%s): BatchNorms outside nn.Sequential stay unfolded",
                    type(model).__name__, exc)
        return 0
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1 or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        if not _foldable(conv, bn):
            continue
        _fuse_into_conv(conv, bn)
        parent_name, _, attr = node.target.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, nn.Identity())
        folded += 1
    return folded
