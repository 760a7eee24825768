"""Weight decay for RepVGG training: parameter groups without decay on BN and biases, and the paper's custom L2.

RepVGG (Ding et al., 2021, sec. 3.3 and the official code) replaces plain weight decay on the branch kernels by an
L2 penalty on each block's *equivalent* 3x3 kernel, the one that remains after re-parameterization. We compute that
kernel with :meth:`RepVGGBlock.kernel_bias`, which is differentiable, so the penalty's gradient reaches every branch
kernel and BN scale exactly as the fused kernel depends on them.

QARepVGG blocks get the same penalty through :meth:`QARepVGGBlock.kernel_bias` (post-sum BN included): the plain L2
of the equivalent kernel, without RepVGG's normalization of the centre term, is the QARepVGG paper's M1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..blocks import QARepVGGBlock, RepVGGBlock

__all__ = ["repvgg_blocks", "custom_l2", "param_groups"]


def repvgg_blocks(model: nn.Module) -> list[RepVGGBlock | QARepVGGBlock]:
    """The training-form :class:`RepVGGBlock` and :class:`QARepVGGBlock` modules of ``model`` (deployed blocks are
    skipped)."""
    return [m for m in model.modules() if isinstance(m, (RepVGGBlock, QARepVGGBlock)) and not m.is_deployed]


def custom_l2(model: nn.Module) -> Tensor:
    """Sum over training-form blocks of the squared L2 norm of the equivalent 3x3 kernel.

    The training loss adds ``0.5 * weight_decay * custom_l2(model)``. The kernel is computed in float64 by the
    block's ``kernel_bias`` (:class:`RepVGGBlock` or :class:`QARepVGGBlock`) and the sum is returned in float32 (a
    scalar with autograd history).
    """
    total = None
    for block in repvgg_blocks(model):
        kernel, _ = block.kernel_bias(torch.float64)
        term = kernel.pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=next(model.parameters()).device)
    return total.float()


def _custom_l2_params(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for block in repvgg_blocks(model):
        for branch in (block.branch_3x3, block.branch_1x1):
            if branch is not None:  # a ConvBN, or QARepVGG's plain 1x1 conv
                ids.add(id(getattr(branch, "conv", branch).weight))
    return ids


def param_groups(model: nn.Module, weight_decay: float, custom_l2_enabled: bool = False) -> list[dict]:
    """Optimizer parameter groups: decay on weights with ``ndim > 1``, none on BN parameters and biases.

    With ``custom_l2_enabled`` the branch kernels of (QA)RepVGG blocks get no decay from the optimizer either; the
    custom L2 term of the loss regularizes them through the equivalent kernel. Other weights (the classifier,
    SE convs, plain convs) keep ordinary decay.
    """
    skip = _custom_l2_params(model) if custom_l2_enabled else set()
    no_decay_names = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in no_decay_names or id(p) in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]
