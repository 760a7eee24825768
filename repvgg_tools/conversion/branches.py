"""A block's branch tensors read from a state dict, validated, and fused a chunk of output channels at a time.

The arithmetic is :func:`repvgg_tools.fusion.core.fuse_branches` (what :class:`~repvgg_tools.blocks.RepVGGBlock` uses);
this module only gathers tensors, checks them (shapes, running statistics, NaN/Inf) with messages that name the
keys of the user's file, and writes the result chunk by chunk so temporaries stay small.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..fusion import core as fusion
from ..io.memory import element_extent
from .layouts import Block, ConversionError

__all__ = ["BranchBN", "Branch", "BlockParts", "read_bn", "block_parts", "fuse_into", "check_finite", "stored_span",
           "BN_STATS"]

CHUNK_ELEMENTS = 1 << 20  # work on chunks of about this many elements (8 MB in fp64), so temporaries stay small
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class BranchBN:
    """The inference-mode tensors of one BatchNorm; ``weight``/``bias`` are ``None`` when it is not affine."""

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None

    def fusion_args(self, eps: float, sl: slice) -> dict:
        """Output channels ``sl``, as the keyword arguments of :func:`fusion.fuse_conv_bn`."""
        pick = (lambda t: None if t is None else t[sl])  # noqa: E731
        return {"running_mean": self.running_mean[sl], "running_var": self.running_var[sl], "eps": eps,
                "bn_weight": pick(self.weight), "bn_bias": pick(self.bias)}


@dataclass
class Branch:
    """``BN(conv(x))``: a kernel ``(C_out, C_in/groups, k, k)``, an optional conv bias, and the BatchNorm (``None``
    for a bare conv: QARepVGG's 1x1)."""

    kernel: Tensor
    bias: Tensor | None
    bn: BranchBN | None


@dataclass
class BlockParts:
    """A training block: the main kxk branch, the optional 1x1 branch, the identity branch (``identity``; with its
    BatchNorm ``identity_bn`` in RepVGG, bare in QARepVGG), the block's groups (they shape the one-hot kernel), and
    QARepVGG's BatchNorm after the sum (``post_bn``)."""

    main: Branch
    side: Branch | None
    identity: bool
    identity_bn: BranchBN | None
    groups: int
    post_bn: BranchBN | None = None

    @property
    def in_channels(self) -> int:
        return self.main.kernel.shape[1] * self.groups


def read_bn(sd: Mapping[str, Tensor], keys: Mapping[str, str], role: str, channels: int, module: str) -> BranchBN:
    """The BatchNorm ``role`` (our name) of ``keys`` (our ``role.param`` -> the file's key), validated.

    Raises:
        ConversionError: missing running statistics, wrong shapes or a negative variance; names ``module``, the
            BatchNorm's name in the user's file.
    """
    get = (lambda p: sd[keys[f"{role}.{p}"]] if f"{role}.{p}" in keys else None)  # noqa: E731
    bn = BranchBN(get("running_mean"), get("running_var"), get("weight"), get("bias"))
    if bn.running_mean is None or bn.running_var is None:
        raise ConversionError(f"{module}: BatchNorm has no running statistics (running_mean/running_var)")
    for name, t in vars(bn).items():
        if t is not None and tuple(t.shape) != (channels,):
            raise ConversionError(f"{module}.{name} has shape {tuple(t.shape)}, expected ({channels},)")
    if bool((bn.running_var < 0).any()):
        raise ConversionError(f"{module}.running_var is negative (corrupt statistics)")
    return bn


def block_parts(sd: Mapping[str, Tensor], b: Block, in_channels: int | None = None, stride: int | None = None
                ) -> BlockParts:
    """The branches of a training block, validated; errors name the block's keys as the file spells them.

    A QARepVGG block (a BatchNorm after the sum) has a bare identity branch with no tensors: it exists, as in the
    reference implementation, when the block keeps its channels (``in_channels``, else the 3x3 kernel's input
    channels with groups 1) at stride 1 (``stride``, else 1).

    Raises:
        ConversionError: shapes that do not form a RepVGG block, or bad BatchNorm statistics.
    """
    keys = b.keys
    w = sd[keys["branch_3x3.conv.weight"]]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
        raise ConversionError(f"{keys['branch_3x3.conv.weight']} has shape {tuple(w.shape)}, not "
                              "(C_out, C_in/groups, k, k) with an odd k")
    c_out = w.shape[0]
    main = Branch(w, sd.get(keys.get("branch_3x3.conv.bias", "")),
                  read_bn(sd, keys, "branch_3x3.bn", c_out, b.module("branch_3x3.bn")))
    side = None
    if "branch_1x1.conv.weight" in keys or "branch_1x1.weight" in keys:
        qa = "branch_1x1.weight" in keys
        key = keys["branch_1x1.weight" if qa else "branch_1x1.conv.weight"]
        w1 = sd[key]
        if tuple(w1.shape) != (c_out, w.shape[1], 1, 1):
            raise ConversionError(f"{key} has shape {tuple(w1.shape)}, expected {(c_out, w.shape[1], 1, 1)}")
        side = Branch(w1, None if qa else sd.get(keys.get("branch_1x1.conv.bias", "")),
                      None if qa else read_bn(sd, keys, "branch_1x1.bn", c_out, b.module("branch_1x1.bn")))
    elif b.has("branch_1x1"):
        raise ConversionError(f"{b.module('branch_1x1.bn')} exists but {b.module('branch_1x1.conv')}.weight does not")
    post_bn = read_bn(sd, keys, "post_bn", c_out, b.module("post_bn")) if b.has("post_bn") else None
    identity, identity_bn, groups = False, None, 1
    if b.has("branch_identity"):
        if c_out % w.shape[1]:
            raise ConversionError(f"{b.module('branch_identity')}: an identity branch needs equal input and output "
                                  f"channels, but {keys['branch_3x3.conv.weight']} has shape {tuple(w.shape)}")
        identity, groups = True, c_out // w.shape[1]
        identity_bn = read_bn(sd, keys, "branch_identity", c_out, b.module("branch_identity"))
    elif post_bn is not None:
        c_in = in_channels if in_channels is not None else w.shape[1]
        groups = c_in // w.shape[1] if c_in % w.shape[1] == 0 else 1
        identity = c_in == c_out and (stride or 1) == 1
    for branch, role in ((main, "branch_3x3.conv.bias"), (side, "branch_1x1.conv.bias")):
        if branch is not None and branch.bias is not None and tuple(branch.bias.shape) != (c_out,):
            raise ConversionError(f"{keys[role]} has shape {tuple(branch.bias.shape)}, expected ({c_out},)")
    return BlockParts(main, side, identity, identity_bn, groups, post_bn)


def fuse_into(out_w: Tensor, out_b: Tensor, parts: BlockParts, eps: float, where: str,
              exact: tuple[Tensor, Tensor] | None = None) -> None:
    """Fuse ``BN(conv(x)) [+ BN(conv1x1(x))] [+ BN(x)]`` into ``(out_w, out_b)``, a chunk of output channels at a
    time; ``out_w`` may be the main kernel itself (each chunk is read before it is written).

    ``exact``: float64 ``(kernel, bias)`` shaped like ``(out_w, out_b)`` that also receive the fusion, unrounded (the
    verifier's check that the fusion is exact and that ``out_w``/``out_b`` are it rounded once); ``None`` keeps
    nothing in float64 beyond one chunk.

    Raises:
        ConversionError: NaN or Inf in a conv weight (names ``where``).
    """
    w = parts.main.kernel
    # one byte per element: the one-hot kernel is exact in any dtype, and the fusion computes in float64
    eye = fusion.identity_kernel(w.shape[0], 1, parts.groups, torch.uint8, w.device) if parts.identity else None
    step = max(1, CHUNK_ELEMENTS // max(1, w[0].numel()))
    for start in range(0, w.shape[0], step):
        sl = slice(start, min(start + step, w.shape[0]))
        branches = [(b.kernel[sl], None if b.bias is None else b.bias[sl],
                     None if b.bn is None else b.bn.fusion_args(eps, sl))
                    for b in (parts.main, parts.side) if b is not None]
        if eye is not None:
            branches.append((eye[sl].double(), None,
                             None if parts.identity_bn is None else parts.identity_bn.fusion_args(eps, sl)))
        if parts.post_bn is None:
            k, b = fusion.fuse_branches(branches, dtype=torch.float64)
        else:
            k, b = fusion.fuse_branches_bn(branches, parts.post_bn.fusion_args(eps, sl), dtype=torch.float64)
        # NaN/Inf in any conv weight survives fusion (x*0 is NaN for them) and makes the float64 sum non-finite
        # (finite fp32-range values cannot overflow it), so one reduction over the result finds it
        if not bool(torch.isfinite(k.sum())):
            raise ConversionError(f"{where}: the conv weights contain NaN or Inf values")
        if exact is not None:
            exact[0][sl].copy_(k)
            exact[1][sl].copy_(b)
        out_w[sl].copy_(k)  # copy_ rounds to the output dtype once, without another temporary
        out_b[sl].copy_(b)


def check_finite(key: str, t: Tensor) -> None:
    """Raise :class:`ConversionError` on NaN/Inf, a chunk at a time (no tensor-sized temporary).

    The scan runs over the bytes the view reaches in its storage, not over the view: an expanded tensor (stride 0)
    declaring billions of elements over a few stored ones costs what is stored.
    """
    if not torch.is_floating_point(t) or not t.numel():
        return
    flat = stored_span(t)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        # a float64 sum is non-finite exactly when an element is (no sum of float32-range values overflows it)
        if not bool(torch.isfinite(flat[start:start + CHUNK_ELEMENTS].sum(dtype=torch.float64))):
            raise ConversionError(f"{key}: contains NaN or Inf values")


def stored_span(t: Tensor) -> Tensor:
    """The elements of ``t``'s storage from the lowest to the highest one the view reaches, as a 1-D view."""
    lowest, count = element_extent(t)
    return t.as_strided((count,), (1,), t.storage_offset() + lowest)
