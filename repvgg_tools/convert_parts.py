"""The pieces of tensor-level conversion that :mod:`repvgg_tools.convert` assembles.

Branch tensors of one block read from a state dict and fused a chunk of output channels at a time (through
:func:`repvgg_tools.fusion.fuse_branches`, the function :class:`~repvgg_tools.blocks.RepVGGBlock` uses), the
architecture of a state dict (named, from its ``arch`` entry, or inferred from shapes), and the verifier that checks
a conversion as a whole model or block by block.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fusion
from .layouts import (
    Block,
    LayoutError,
    RepVGGSpec,
    infer_repvgg_spec,
    infer_vgg_name,
    state_dict_mismatch,
)
from .verify import compare_outputs

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 20  # work on chunks of about this many elements (8 MB in fp64), so temporaries stay small
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


class ConversionError(ValueError):
    """The input cannot be converted (wrong architecture, corrupt weights, unknown layout); one-line message."""



# ------------------------------------------------------------------------------------------------------- fusion
@dataclass
class BranchBN:
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None

    def branch(self, kernel: Tensor, conv_bias: Tensor | None, eps: float, sl: slice):
        """Output channels ``sl`` of this branch, as :func:`fusion.fuse_branches` takes it."""
        pick = (lambda t: None if t is None else t[sl])  # noqa: E731
        bn = {"running_mean": self.running_mean[sl], "running_var": self.running_var[sl], "eps": eps,
              "bn_weight": pick(self.weight), "bn_bias": pick(self.bias)}
        return kernel[sl], pick(conv_bias), bn


def read_bn(sd: Mapping[str, Tensor], keys: Mapping[str, str], role: str, channels: int, where: str) -> BranchBN:
    get = (lambda p: sd[keys[f"{role}.{p}"]] if f"{role}.{p}" in keys else None)  # noqa: E731
    bn = BranchBN(get("running_mean"), get("running_var"), get("weight"), get("bias"))
    if bn.running_mean is None or bn.running_var is None:
        raise ConversionError(f"{where}: BatchNorm {role} has no running statistics")
    for name, t in vars(bn).items():
        if t is not None and tuple(t.shape) != (channels,):
            raise ConversionError(f"{where}: BatchNorm {role}.{name} has shape {tuple(t.shape)}, expected "
                                  f"({channels},)")
    if bool((bn.running_var < 0).any()):
        raise ConversionError(f"{where}: BatchNorm {role}.running_var is negative (corrupt statistics)")
    return bn


def fuse_into(out_w: Tensor, out_b: Tensor, main: tuple[Tensor, Tensor | None, BranchBN],
               side: tuple[Tensor, Tensor | None, BranchBN] | None, identity: tuple[int, BranchBN] | None, eps: float,
               where: str) -> None:
    """Fuse ``BN(conv(x)) [+ BN(conv1x1(x))] [+ BN(x)]`` into ``(out_w, out_b)``, a chunk of output channels at a
    time, so temporaries stay small; ``out_w`` may be the main kernel itself (each chunk is read before written)."""
    w = main[0]
    # one byte per element: the one-hot kernel is exact in any dtype, and fuse_conv_bn computes in float64
    eye = fusion.identity_kernel(w.shape[0], 1, identity[0], torch.uint8, w.device) if identity else None
    step = max(1, CHUNK_ELEMENTS // max(1, w[0].numel()))
    for start in range(0, w.shape[0], step):
        sl = slice(start, min(start + step, w.shape[0]))
        branches = [main[2].branch(main[0], main[1], eps, sl)]
        if side is not None:
            branches.append(side[2].branch(side[0], side[1], eps, sl))
        if eye is not None:
            branches.append(identity[1].branch(eye, None, eps, sl))
        k, b = fusion.fuse_branches(branches, dtype=torch.float64)
        # NaN/Inf in any conv weight survives fusion (x*0 is NaN for them), so one pass over the result finds it
        if not bool(torch.isfinite(k).all()):
            raise ConversionError(f"{where}: the conv weights contain NaN or Inf values")
        out_w[sl].copy_(k)  # copy_ rounds to the output dtype once, without another temporary
        out_b[sl].copy_(b)


def block_parts(sd: Mapping[str, Tensor], b: Block):
    """``(main, side, identity)`` of a training block, validated."""
    keys, where = b.keys, b.prefix or "<root>"
    w = sd[keys["branch_3x3.conv.weight"]]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
        raise ConversionError(f"{where}: 3x3 conv weight has shape {tuple(w.shape)}, not (C_out, C_in/g, k, k)")
    c_out = w.shape[0]
    main = (w, sd.get(keys.get("branch_3x3.conv.bias", "")), read_bn(sd, keys, "branch_3x3.bn", c_out, where))
    side = None
    if "branch_1x1.conv.weight" in keys:
        w1 = sd[keys["branch_1x1.conv.weight"]]
        if tuple(w1.shape) != (c_out, w.shape[1], 1, 1):
            raise ConversionError(f"{where}: 1x1 conv weight has shape {tuple(w1.shape)}, expected "
                                  f"{(c_out, w.shape[1], 1, 1)}")
        side = (w1, sd.get(keys.get("branch_1x1.conv.bias", "")), read_bn(sd, keys, "branch_1x1.bn", c_out, where))
    elif b.has("branch_1x1"):
        raise ConversionError(f"{where}: 1x1 branch has a BatchNorm but no conv weight")
    identity = None
    if b.has("branch_identity"):
        if c_out % w.shape[1]:
            raise ConversionError(f"{where}: identity branch needs equal input and output channels")
        identity = (c_out // w.shape[1], read_bn(sd, keys, "branch_identity", c_out, where))
    for bias in (main[1], side[1] if side else None):
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ConversionError(f"{where}: conv bias has shape {tuple(bias.shape)}, expected ({c_out},)")
    return main, side, identity


def branches_forward(x: Tensor, main, side, identity, eps: float) -> Tensor:
    """Reference output of a training block (stride 1, dilation 1) computed without fusion.py."""
    def conv_bn(x, w, b, bn, groups):
        y = F.conv2d(x, w.to(x.dtype), None if b is None else b.to(x.dtype), padding=w.shape[-1] // 2, groups=groups)
        cast = (lambda t: None if t is None else t.to(x.dtype))  # noqa: E731
        return F.batch_norm(y, cast(bn.running_mean), cast(bn.running_var), cast(bn.weight), cast(bn.bias),
                            False, 0.0, eps)

    groups = x.shape[1] // main[0].shape[1]
    out = conv_bn(x, *main, groups)
    if side is not None:
        out = out + conv_bn(x, *side, groups)
    if identity is not None:
        bn = identity[1]
        cast = (lambda t: None if t is None else t.to(x.dtype))  # noqa: E731
        out = out + F.batch_norm(x, cast(bn.running_mean), cast(bn.running_var), cast(bn.weight), cast(bn.bias),
                                 False, 0.0, eps)
    return out


def check_finite(key: str, t: Tensor) -> None:
    """Raise on NaN/Inf, a chunk at a time (no tensor-sized temporary)."""
    if not torch.is_floating_point(t):
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        if not bool(torch.isfinite(flat[start:start + CHUNK_ELEMENTS]).all()):
            raise ConversionError(f"{key}: contains NaN or Inf values")


def verify_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


# ------------------------------------------------------------------------------------------------- architecture
@dataclass
class Arch:
    name: str
    num_classes: int
    build: Callable[[bool], nn.Module]
    in_chans: int = 3


def normalize_arch(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def resolve_arch(canon: Mapping[str, Tensor], arch: str | None, hint: Any, vgg: bool, deploy: bool) -> Arch | None:
    """The architecture of a standalone state dict in our layout: ``arch`` (must fit), else the checkpoint's own
    ``arch`` entry when it fits, else inferred from shapes. ``None`` when nothing fits (verify block by block)."""
    from .models import create_model, is_model, list_models

    head = canon.get("classifier.6.weight" if vgg else "head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else (1000 if vgg else 0)
    stem = canon.get("features.0.weight" if vgg else ("stem.reparam.weight" if deploy else
                                                       "stem.branch_3x3.conv.weight"))
    in_chans = int(stem.shape[1]) if stem is not None else 3

    def named(name: str) -> Arch | None | str:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, deploy=deploy)
        problem = state_dict_mismatch(model, canon)
        if problem:
            return problem
        return Arch(name, num_classes, lambda d: create_model(name, num_classes=num_classes, deploy=d), in_chans)

    if arch is not None:
        if not is_model(arch):
            close = [m for m in list_models() if m.split("_")[0] in arch.lower()] or list_models()
            raise ConversionError(f"unknown arch {arch!r}; known models: {', '.join(close)}")
        found = named(arch)
        if isinstance(found, str):
            raise ConversionError(f"weights do not fit --arch {arch}: {found}")
        return found
    if isinstance(hint, str) and is_model(normalize_arch(hint)):
        found = named(normalize_arch(hint))
        if not isinstance(found, str):
            return found
        log.warning("checkpoint says arch=%s but its weights do not fit (%s); inferring from shapes", hint, found)
    if vgg:
        name, _ = infer_vgg_name(canon)
        return named(name) if name else None
    try:
        spec: RepVGGSpec = infer_repvgg_spec(canon)
    except LayoutError as exc:
        log.warning("cannot read a RepVGG architecture from the weights (%s); verifying block by block", exc)
        return None
    return Arch(spec.describe(), spec.num_classes, spec.build, spec.in_chans)


def complete_state_dict(model: nn.Module, sd: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """``sd`` cast to ``dtype`` (no copy when it already is), with the ``num_batches_tracked`` buffers it lacks."""
    out = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in sd.items()}
    for k, v in model.state_dict().items():
        if k not in out and k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=v.dtype)
    return out


@torch.no_grad()
def run_on(arch: Arch, deploy: bool, sd: Mapping[str, Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """Outputs of ``arch`` holding the tensors of ``sd`` (assigned, not copied) on ``inputs``."""
    with torch.device("meta"):
        model = arch.build(deploy)
    model.load_state_dict(complete_state_dict(model, sd, inputs[0].dtype), strict=True, assign=True)
    model.eval()
    return [model(x) for x in inputs]


def param_count(sd: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for k, v in sd.items() if isinstance(v, Tensor) and not k.endswith(BN_STATS))



class Verifier:
    """Checks a conversion and times itself: the whole model on small random inputs (``model``), or each fused unit
    against its branches on a 7x7 input (``blocks``: stride 1, dilation 1, dense where the groups are unknown)."""

    def __init__(self, arch: Arch | None, train_sd: Mapping[str, Tensor] | None, weight: Tensor, size: int) -> None:
        self.arch, self.mode = arch, ("model" if arch is not None else "blocks")
        self.dtype = verify_dtype(weight)
        self.gen = torch.Generator().manual_seed(0)
        self.max_abs = self.max_rel = self.seconds = 0.0
        if arch is not None:  # reference outputs now, before in-place fusion overwrites the 3x3 kernels
            with self._timed():
                self.inputs = [self._randn(2, arch.in_chans, size, size)]  # two random images
                self.ref = run_on(arch, False, train_sd, self.inputs)

    @contextlib.contextmanager
    def _timed(self):
        start = time.perf_counter()
        try:
            with torch.no_grad():
                yield
        finally:
            self.seconds += time.perf_counter() - start

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(self.dtype)

    def _record(self, out, ref) -> None:
        a, r = compare_outputs(out, ref)
        self.max_abs, self.max_rel = max(self.max_abs, a), max(self.max_rel, r)

    def before(self, main, side, identity, eps: float):
        if self.mode != "blocks":
            return None
        with self._timed():
            x = self._randn(2, main[0].shape[1] * (identity[0] if identity else 1), 7, 7)
            return x, branches_forward(x, main, side, identity, eps)

    def after(self, probe, kernel: Tensor, bias: Tensor) -> None:
        if probe is None:
            return
        x, ref = probe
        with self._timed():
            groups = x.shape[1] // kernel.shape[1]
            self._record(F.conv2d(x, kernel.to(x.dtype), bias.to(x.dtype), padding=kernel.shape[-1] // 2,
                                  groups=groups), ref)

    def finish(self, report: Any, deploy_sd: Callable[[], Mapping[str, Tensor]]) -> None:
        if self.mode == "model":
            with self._timed():
                for out, ref in zip(run_on(self.arch, True, deploy_sd(), self.inputs), self.ref, strict=True):
                    self._record(out, ref)
        # ``report`` is a ConversionReport (defined in convert.py, which imports this module)
        report.verify_mode, report.verify_seconds = self.mode, self.seconds
        report.max_abs, report.max_rel = self.max_abs, self.max_rel


def fuse_unit(main, side, identity, eps: float, inplace: bool, verifier: Verifier | None,
               where: str) -> tuple[Tensor, Tensor]:
    w = main[0]
    kernel = w if inplace else torch.empty_like(w)
    bias = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    probe = verifier.before(main, side, identity, eps) if verifier else None
    fuse_into(kernel, bias, main, side, identity, eps, where)
    if verifier:
        verifier.after(probe, kernel, bias)
    return kernel, bias
