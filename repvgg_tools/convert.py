"""Checkpoint conversion at the tensor level: training-form RepVGG / VGG-BN state dicts -> deploy form, verified.

No model is built to convert: each block's tensors go through :mod:`repvgg_tools.fusion` (the functions
:class:`~repvgg_tools.blocks.RepVGGBlock` uses), a few output channels at a time, and with ``inplace`` the fused
kernel overwrites the 3x3 kernel it came from, so a memory-mapped checkpoint converts in about its own size of RAM.
Verification builds the two models on the ``meta`` device and points them at the same tensors (no copies), runs a
few small random inputs, and compares; a state dict that is not a standalone classifier (a detector holding a RepVGG
backbone) is verified block by block instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fusion
from .checkpoint import CheckpointError, read_checkpoint, release_pages, save_checkpoint
from .layouts import (
    LAYOUT_NAMES,
    LAYOUTS,
    Block,
    Layout,
    LayoutError,
    RepVGGSpec,
    VggPair,
    block_key,
    detect_layout,
    find_blocks,
    find_vgg_pairs,
    infer_repvgg_spec,
    infer_vgg_name,
    is_standalone,
    map_block_prefix,
    map_head_key,
    rename_layout,
    state_dict_mismatch,
    vgg_index_map,
)
from .verify import DEFAULT_RTOL, compare_outputs

__all__ = ["ConversionError", "VerificationError", "ConversionReport", "convert_state_dict", "convert_file",
           "load_model"]

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 20  # work on chunks of about this many elements (8 MB in fp64), so temporaries stay small
PROGRESS_MIN_PARAMS = 20_000_000
_STATS = ("running_mean", "running_var", "num_batches_tracked")


class ConversionError(ValueError):
    """The input cannot be converted (wrong architecture, corrupt weights, unknown layout); one-line message."""


class VerificationError(RuntimeError):
    """The converted weights do not reproduce the original outputs within tolerance. ``report`` has the numbers."""

    def __init__(self, report: ConversionReport) -> None:
        super().__init__(f"verification failed: max rel err {report.max_rel:.3e} > tolerance {report.rtol:.0e}")
        self.report = report


@dataclass
class ConversionReport:
    """What a conversion did. ``max_abs``/``max_rel`` are ``None`` without verification."""

    layout: str
    out_layout: str
    arch: str | None = None
    num_classes: int | None = None
    blocks_fused: int = 0
    blocks_already_deployed: int = 0
    tensors_carried: int = 0
    params_before: int = 0
    params_after: int = 0
    dtype: str = ""
    verify_mode: str | None = None  # "model" (whole model, small input) or "blocks" (block by block)
    max_abs: float | None = None
    max_rel: float | None = None
    rtol: float = DEFAULT_RTOL
    passed: bool | None = None
    convert_seconds: float = 0.0
    verify_seconds: float = 0.0
    load_seconds: float = 0.0
    save_seconds: float = 0.0
    seconds: float = 0.0
    input: str | None = None
    output: str | None = None
    extras: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        layouts = self.layout if self.layout == self.out_layout else f"{self.layout} -> {self.out_layout}"
        lines = [f"layout:      {layouts}", f"arch:        {self.arch or 'unknown (blocks only)'}",
                 f"blocks:      {self.blocks_fused} fused, {self.blocks_already_deployed} already deployed, "
                 f"{self.tensors_carried} other tensors carried",
                 f"parameters:  {self.params_before:,} -> {self.params_after:,} ({self.dtype})"]
        if self.max_rel is None:
            lines.append("verify:      " + ("skipped" if self.blocks_fused else "nothing to verify (nothing fused)"))
        else:
            verdict = "ok" if self.passed else "FAILED"
            lines.append(f"verify:      {self.verify_mode}: max abs err {self.max_abs:.3e}, max rel err "
                         f"{self.max_rel:.3e} (tolerance {self.rtol:.0e}) {verdict} in {self.verify_seconds:.2f} s")
        if self.dropped:
            lines.append(f"dropped:     {', '.join(self.dropped)}")
        lines.append(f"time:        {self.seconds:.2f} s (load {self.load_seconds:.2f}, convert "
                     f"{self.convert_seconds:.2f}, verify {self.verify_seconds:.2f}, save {self.save_seconds:.2f})")
        return lines


# ------------------------------------------------------------------------------------------------------- fusion
@dataclass
class _BN:
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


def _bn(sd: Mapping[str, Tensor], keys: Mapping[str, str], role: str, channels: int, where: str) -> _BN:
    get = (lambda p: sd[keys[f"{role}.{p}"]] if f"{role}.{p}" in keys else None)  # noqa: E731
    bn = _BN(get("running_mean"), get("running_var"), get("weight"), get("bias"))
    if bn.running_mean is None or bn.running_var is None:
        raise ConversionError(f"{where}: BatchNorm {role} has no running statistics")
    for name, t in vars(bn).items():
        if t is not None and tuple(t.shape) != (channels,):
            raise ConversionError(f"{where}: BatchNorm {role}.{name} has shape {tuple(t.shape)}, expected "
                                  f"({channels},)")
    if bool((bn.running_var < 0).any()):
        raise ConversionError(f"{where}: BatchNorm {role}.running_var is negative (corrupt statistics)")
    return bn


def _fuse_into(out_w: Tensor, out_b: Tensor, main: tuple[Tensor, Tensor | None, _BN],
               side: tuple[Tensor, Tensor | None, _BN] | None, identity: tuple[int, _BN] | None, eps: float,
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


def _block_parts(sd: Mapping[str, Tensor], b: Block):
    """``(main, side, identity)`` of a training block, validated."""
    keys, where = b.keys, b.prefix or "<root>"
    w = sd[keys["branch_3x3.conv.weight"]]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0:
        raise ConversionError(f"{where}: 3x3 conv weight has shape {tuple(w.shape)}, not (C_out, C_in/g, k, k)")
    c_out = w.shape[0]
    main = (w, sd.get(keys.get("branch_3x3.conv.bias", "")), _bn(sd, keys, "branch_3x3.bn", c_out, where))
    side = None
    if "branch_1x1.conv.weight" in keys:
        w1 = sd[keys["branch_1x1.conv.weight"]]
        if tuple(w1.shape) != (c_out, w.shape[1], 1, 1):
            raise ConversionError(f"{where}: 1x1 conv weight has shape {tuple(w1.shape)}, expected "
                                  f"{(c_out, w.shape[1], 1, 1)}")
        side = (w1, sd.get(keys.get("branch_1x1.conv.bias", "")), _bn(sd, keys, "branch_1x1.bn", c_out, where))
    elif b.has("branch_1x1"):
        raise ConversionError(f"{where}: 1x1 branch has a BatchNorm but no conv weight")
    identity = None
    if b.has("branch_identity"):
        if c_out % w.shape[1]:
            raise ConversionError(f"{where}: identity branch needs equal input and output channels")
        identity = (c_out // w.shape[1], _bn(sd, keys, "branch_identity", c_out, where))
    for bias in (main[1], side[1] if side else None):
        if bias is not None and tuple(bias.shape) != (c_out,):
            raise ConversionError(f"{where}: conv bias has shape {tuple(bias.shape)}, expected ({c_out},)")
    return main, side, identity


def _branches_forward(x: Tensor, main, side, identity, eps: float) -> Tensor:
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


def _check_finite(key: str, t: Tensor) -> None:
    """Raise on NaN/Inf, a chunk at a time (no tensor-sized temporary)."""
    if not torch.is_floating_point(t):
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        if not bool(torch.isfinite(flat[start:start + CHUNK_ELEMENTS]).all()):
            raise ConversionError(f"{key}: contains NaN or Inf values")


def _verify_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


# ------------------------------------------------------------------------------------------------- architecture
@dataclass
class _Arch:
    name: str
    num_classes: int
    build: Callable[[bool], nn.Module]
    in_chans: int = 3


def _normalize_arch(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _resolve_arch(canon: Mapping[str, Tensor], arch: str | None, hint: Any, vgg: bool, deploy: bool) -> _Arch | None:
    """The architecture of a standalone state dict in our layout: ``arch`` (must fit), else the checkpoint's own
    ``arch`` entry when it fits, else inferred from shapes. ``None`` when nothing fits (verify block by block)."""
    from .models import create_model, is_model, list_models

    head = canon.get("classifier.6.weight" if vgg else "head.fc.weight")
    num_classes = int(head.shape[0]) if head is not None else (1000 if vgg else 0)
    stem = canon.get("features.0.weight" if vgg else ("stem.reparam.weight" if deploy else
                                                       "stem.branch_3x3.conv.weight"))
    in_chans = int(stem.shape[1]) if stem is not None else 3

    def named(name: str) -> _Arch | None | str:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes, deploy=deploy)
        problem = state_dict_mismatch(model, canon)
        if problem:
            return problem
        return _Arch(name, num_classes, lambda d: create_model(name, num_classes=num_classes, deploy=d), in_chans)

    if arch is not None:
        if not is_model(arch):
            close = [m for m in list_models() if m.split("_")[0] in arch.lower()] or list_models()
            raise ConversionError(f"unknown arch {arch!r}; known models: {', '.join(close)}")
        found = named(arch)
        if isinstance(found, str):
            raise ConversionError(f"weights do not fit --arch {arch}: {found}")
        return found
    if isinstance(hint, str) and is_model(_normalize_arch(hint)):
        found = named(_normalize_arch(hint))
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
    return _Arch(spec.describe(), spec.num_classes, spec.build, spec.in_chans)


def _complete(model: nn.Module, sd: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """``sd`` cast to ``dtype`` (no copy when it already is), with the ``num_batches_tracked`` buffers it lacks."""
    out = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in sd.items()}
    for k, v in model.state_dict().items():
        if k not in out and k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=v.dtype)
    return out


@torch.no_grad()
def _run_on(arch: _Arch, deploy: bool, sd: Mapping[str, Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """Outputs of ``arch`` holding the tensors of ``sd`` (assigned, not copied) on ``inputs``."""
    with torch.device("meta"):
        model = arch.build(deploy)
    model.load_state_dict(_complete(model, sd, inputs[0].dtype), strict=True, assign=True)
    model.eval()
    return [model(x) for x in inputs]


def _param_count(sd: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for k, v in sd.items() if isinstance(v, Tensor) and not k.endswith(_STATS))


# --------------------------------------------------------------------------------------------------- conversion
def convert_state_dict(
    sd: Mapping[str, Tensor],
    arch: str | None = None,
    layout: str | None = None,
    out_layout: str | None = None,
    verify: bool = True,
    *,
    inplace: bool = False,
    arch_hint: Any = None,
    rtol: float = DEFAULT_RTOL,
    bn_eps: float = 1e-5,
    input_size: int | None = None,
    progress: bool = False,
    release_mapped: bool = False,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert a training-form RepVGG (any layout) or VGG-BN state dict to its deploy form.

    Args:
        sd: name -> tensor, container and ``module.`` prefixes already removed
            (see :func:`repvgg_tools.checkpoint.read_state_dict`).
        arch: a registered model name the weights must fit; default: the ``arch_hint`` if it fits, else inferred.
        layout: input layout (one of ``LAYOUT_NAMES``); default: detected.
        out_layout: output layout; default: the input's.
        verify: compare the two forms on random inputs and raise :class:`VerificationError` beyond ``rtol``.
        inplace: reuse the input's tensors: fused kernels overwrite the 3x3 kernels and ``sd`` is emptied as blocks
            fuse (pass a dict you own; memory-mapped tensors are safe, the file is never written).
        arch_hint: the checkpoint's own ``arch`` entry, used when it fits.
        rtol: verification tolerance, ``max|a-b| / max|b|``.
        bn_eps: BatchNorm epsilon (checkpoints do not store it; every supported layout uses 1e-5).
        input_size: side of the random verification inputs (default 64 for RepVGG, 32 for VGG).
        progress: show a progress bar on stderr for large models.
        release_mapped: with ``inplace``, the tensors come from ``load_checkpoint(mmap=True)``: give the pages of
            consumed branch tensors back to the OS as blocks fuse (see :func:`~repvgg_tools.checkpoint.release_pages`).

    Returns:
        ``(deploy_state_dict, report)``.

    Raises:
        ConversionError: not a RepVGG/VGG-BN state dict, corrupt weights (NaN/Inf, negative variance), or weights
            that do not fit ``arch``.
        VerificationError: the outputs differ beyond ``rtol``.
    """
    start = time.perf_counter()
    if not isinstance(sd, Mapping) or not sd:
        raise ConversionError("empty state dict")
    for name in (layout, out_layout):
        if name is not None and name not in LAYOUT_NAMES:
            raise ConversionError(f"unknown layout {name!r}; choose from {', '.join(LAYOUT_NAMES)}")
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise ConversionError(f"{k}: not a tensor ({type(v).__name__})")
    detected = detect_layout(sd)
    layout = layout or detected
    if layout is None:
        preview = ", ".join(list(sd)[:3])
        raise ConversionError(f"no RepVGG blocks or VGG conv+BatchNorm layers found; not a RepVGG/VGG checkpoint "
                              f"(keys: {preview}, ...)")
    work = sd if inplace else dict(sd)
    params_before = _param_count(work)
    dtype = next((v.dtype for v in work.values() if torch.is_floating_point(v)), torch.float32)
    try:
        if layout == "torchvision" or (layout == "ours" and detected == "torchvision"):
            out, report = _convert_vgg(work, arch, arch_hint, out_layout, verify, inplace, bn_eps, input_size or 32,
                                       progress, release_mapped and inplace)
        else:
            if layout == "torchvision" or out_layout == "torchvision":
                raise ConversionError("the torchvision layout is for VGG models; RepVGG converts to ours, official, "
                                      "timm or mmpretrain")
            out, report = _convert_repvgg(work, LAYOUTS[layout], LAYOUTS[out_layout or layout], detected, arch,
                                          arch_hint, verify, inplace, bn_eps, input_size or 64, progress,
                                          release_mapped and inplace)
    except LayoutError as exc:
        raise ConversionError(str(exc)) from None
    report.params_before, report.params_after = params_before, _param_count(out)
    report.dtype, report.rtol = str(dtype).replace("torch.", ""), rtol
    report.convert_seconds = time.perf_counter() - start - report.verify_seconds
    report.seconds = time.perf_counter() - start
    if report.max_rel is not None:
        report.passed = report.max_rel <= rtol
        log.info("verification (%s): max abs %.3e, max rel %.3e", report.verify_mode, report.max_abs, report.max_rel)
        if not report.passed:
            raise VerificationError(report)
    return out, report


def _progress(items: list, total_params: int, enabled: bool, desc: str):
    if not enabled or total_params < PROGRESS_MIN_PARAMS:
        return items
    from tqdm import tqdm

    # disable=None: only on a terminal, so logs and captured stderr stay clean
    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, leave=False, disable=None)


class _Verifier:
    """Checks a conversion and times itself: the whole model on small random inputs (``model``), or each fused unit
    against its branches on a 7x7 input (``blocks``: stride 1, dilation 1, dense where the groups are unknown)."""

    def __init__(self, arch: _Arch | None, train_sd: Mapping[str, Tensor] | None, weight: Tensor, size: int) -> None:
        self.arch, self.mode = arch, ("model" if arch is not None else "blocks")
        self.dtype = _verify_dtype(weight)
        self.gen = torch.Generator().manual_seed(0)
        self.max_abs = self.max_rel = self.seconds = 0.0
        if arch is not None:  # reference outputs now, before in-place fusion overwrites the 3x3 kernels
            with self._timed():
                self.inputs = [self._randn(2, arch.in_chans, size, size)]  # two random images
                self.ref = _run_on(arch, False, train_sd, self.inputs)

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
            return x, _branches_forward(x, main, side, identity, eps)

    def after(self, probe, kernel: Tensor, bias: Tensor) -> None:
        if probe is None:
            return
        x, ref = probe
        with self._timed():
            groups = x.shape[1] // kernel.shape[1]
            self._record(F.conv2d(x, kernel.to(x.dtype), bias.to(x.dtype), padding=kernel.shape[-1] // 2,
                                  groups=groups), ref)

    def finish(self, report: ConversionReport, deploy_sd: Callable[[], Mapping[str, Tensor]]) -> None:
        if self.mode == "model":
            with self._timed():
                for out, ref in zip(_run_on(self.arch, True, deploy_sd(), self.inputs), self.ref, strict=True):
                    self._record(out, ref)
        report.verify_mode, report.verify_seconds = self.mode, self.seconds
        report.max_abs, report.max_rel = self.max_abs, self.max_rel


def _fuse_unit(main, side, identity, eps: float, inplace: bool, verifier: _Verifier | None,
               where: str) -> tuple[Tensor, Tensor]:
    w = main[0]
    kernel = w if inplace else torch.empty_like(w)
    bias = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    probe = verifier.before(main, side, identity, eps) if verifier else None
    _fuse_into(kernel, bias, main, side, identity, eps, where)
    if verifier:
        verifier.after(probe, kernel, bias)
    return kernel, bias


def _convert_repvgg(sd, src: Layout, dst: Layout, detected, arch, hint, verify, inplace, eps, size, progress, release):
    blocks = find_blocks(sd, src)
    if not blocks:
        raise ConversionError(f"no RepVGG blocks in the {src.name} layout found"
                              + (f" (the keys look like the {detected} layout)" if detected else ""))
    standalone = is_standalone(sd, blocks, src)
    training = [b for b in blocks if not b.deployed]
    parts = {b.prefix: _block_parts(sd, b) for b in training}  # validates every block before anything changes
    report = ConversionReport(src.name, dst.name, blocks_already_deployed=len(blocks) - len(training))
    model_arch = canon = None
    if standalone and len(training) in (0, len(blocks)):
        canon = rename_layout(sd, src, LAYOUTS["ours"], blocks, True)
        model_arch = _resolve_arch(canon, arch, hint, False, deploy=not training)
        if model_arch is not None:
            report.arch, report.num_classes = model_arch.name, model_arch.num_classes
    elif arch is not None:
        log.warning("--arch %s ignored: the checkpoint holds more than a RepVGG classifier", arch)
    verifier = None
    if verify and training:
        verifier = _Verifier(model_arch, canon, sd[training[0].keys["branch_3x3.conv.weight"]], size)
    del canon
    where = {k: b for b in blocks for k in b.keys.values()}
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key in _progress(list(sd), sum(v.numel() for v in sd.values()), progress, "fusing"):
        b = where.get(key)
        if b is None:
            _check_finite(key, sd[key])
            out[(map_head_key(key, src, dst) if standalone else None) or key] = sd.pop(key) if inplace else sd[key]
            report.tensors_carried += 1
            continue
        if b.prefix in done:
            continue
        done.add(b.prefix)
        for role, k in b.keys.items():
            if b.deployed or not role.endswith("conv.weight"):  # conv kernels are checked after fusion
                _check_finite(k, sd[k])
        new_prefix = map_block_prefix(b.prefix, src, dst, standalone)
        for role in [r for r in b.keys if r.startswith("se.") or b.deployed]:
            out[block_key(new_prefix, dst.key(role))] = sd[b.keys[role]]
        if not b.deployed:
            main, side, identity = parts.pop(b.prefix)
            kernel, bias = _fuse_unit(main, side, identity, eps, inplace, verifier, b.prefix or "<root>")
            out[block_key(new_prefix, dst.key("reparam.weight"))] = kernel
            out[block_key(new_prefix, dst.key("reparam.bias"))] = bias
            report.blocks_fused += 1
            del main, side, identity
        for role, k in b.keys.items() if inplace else ():
            t = sd.pop(k)
            if release and not b.deployed and role != "branch_3x3.conv.weight" and not role.startswith("se."):
                release_pages(t)
    if verifier is not None:
        verifier.finish(report, lambda: rename_layout(out, dst, LAYOUTS["ours"], find_blocks(out, dst), True))
    return out, report


def _convert_vgg(sd, arch, hint, out_layout, verify, inplace, eps, size, progress, release):
    if out_layout not in (None, "torchvision", "ours"):
        raise ConversionError(f"a VGG converts to the torchvision layout, not {out_layout!r}")
    pairs = find_vgg_pairs(sd)
    report = ConversionReport("torchvision", "torchvision")
    standalone = all(p.root == "features." for p in pairs) and all(
        k.startswith(("features.", "classifier.")) for k in sd)
    model_arch = _resolve_arch(sd, arch, hint, True, deploy=not pairs) if standalone else None
    if model_arch is not None:
        report.arch, report.num_classes = model_arch.name, model_arch.num_classes
    elif arch is not None and not standalone:
        log.warning("--arch %s ignored: the checkpoint holds more than a VGG classifier", arch)
    parts: dict[str, tuple[VggPair, tuple]] = {}
    for p in pairs:
        w = sd[p.conv("weight")]
        keys = {f"bn.{n}": p.bn(n) for n in ("weight", "bias", "running_mean", "running_var") if p.bn(n) in sd}
        parts[p.conv("weight")] = (p, (w, sd.get(p.conv("bias")), _bn(sd, keys, "bn", w.shape[0], p.conv(""))))
    verifier = _Verifier(model_arch, sd, sd[pairs[0].conv("weight")], size) if verify and pairs else None
    rename = vgg_index_map(sd, pairs)
    consumed = {p.bn(n) for p in pairs for n in ("weight", "bias") + _STATS} | {p.conv("bias") for p in pairs}
    out: dict[str, Tensor] = {}
    for key in _progress(list(sd), sum(v.numel() for v in sd.values()), progress, "folding"):
        if key in consumed:
            continue
        if key not in parts:
            _check_finite(key, sd[key])
            out[rename.get(key, key)] = sd[key]
            report.tensors_carried += 1
            continue
        p, main = parts.pop(key)
        for k in [key, p.conv("bias")] + [p.bn(n) for n in ("weight", "bias") + _STATS]:
            if k in sd:
                _check_finite(k, sd[k])
        kernel, bias = _fuse_unit(main, None, None, eps, inplace, verifier, p.conv("")[:-1])
        out[rename[key]], out[rename[key][: -len("weight")] + "bias"] = kernel, bias
        report.blocks_fused += 1
        for t in (main[1], *vars(main[2]).values()) if release else ():
            if t is not None:
                release_pages(t)
    if inplace:
        sd.clear()
    if verifier is not None:
        verifier.finish(report, lambda: out)
    return out, report


# ------------------------------------------------------------------------------------------------------- files
def _check_output(input: Path, output: Path, force: bool) -> None:
    """Fail before any work when OUTPUT cannot or must not be written."""
    if output.exists() and input.exists() and os.path.samefile(output, input) or output.resolve() == input.resolve():
        raise CheckpointError(f"{output}: OUTPUT is the INPUT file; choose another name (the input is never "
                              "overwritten)")
    if output.is_dir():
        raise CheckpointError(f"{output}: is a directory")
    if output.exists() and not force:
        raise CheckpointError(f"{output}: already exists (use --force to overwrite)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise CheckpointError(f"{output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{output}: directory {parent} is not writable")


def convert_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    arch: str | None = None,
    layout: str | None = None,
    out_layout: str | None = None,
    ema: bool = False,
    verify: bool = True,
    force: bool = False,
    progress: bool = False,
    rtol: float = DEFAULT_RTOL,
) -> ConversionReport:
    """Convert a checkpoint file to its deploy form, atomically (what ``repvgg-convert`` runs).

    The input is memory-mapped and converted in place in memory (never on disk). Non-model entries (epoch, arch,
    args, ...) are carried over, optimizer state is dropped. The container is kept (a bare state dict stays bare);
    ``.safetensors`` output gets the state dict, with the other entries as string metadata.

    Args:
        input, output: paths; ``output`` must differ from ``input``.
        arch, layout, out_layout, verify, rtol: see :func:`convert_state_dict`.
        ema: convert the EMA weights (``model_ema``, ``state_dict_ema``, ``ema``).
        force: overwrite an existing ``output``.
        progress: progress bar on stderr for large models.

    Returns:
        The report, with load/save times and paths.

    Raises:
        CheckpointError: unreadable input, or an output that cannot be written.
        ConversionError: see :func:`convert_state_dict`.
        VerificationError: nothing is written.
    """
    start = time.perf_counter()
    input, output = Path(input), Path(output)
    _check_output(input, output, force)
    contents = read_checkpoint(input, ema=ema)
    load_seconds = time.perf_counter() - start
    deploy, report = convert_state_dict(
        contents.state_dict, arch, layout, out_layout, verify, inplace=True, arch_hint=contents.extras.get("arch"),
        rtol=rtol, progress=progress, release_mapped=contents.format == "zip",
    )
    extras = dict(contents.extras)
    if "layout" in extras:
        extras["layout"] = report.out_layout
    if output.suffix == ".safetensors":
        obj: dict[str, Any] = {**{k: v for k, v in extras.items() if k not in deploy}, **deploy}
    elif contents.container_key is None and not extras:
        obj = deploy
    else:
        key = contents.container_key if contents.container_key and not ema else "state_dict"
        obj = {**extras, key: deploy}
    t0 = time.perf_counter()
    save_checkpoint(obj, output, force=force)
    report.save_seconds = time.perf_counter() - t0
    report.load_seconds, report.input, report.output = load_seconds, str(input), str(output)
    report.extras, report.dropped = sorted(map(str, extras)), sorted(map(str, contents.dropped))
    report.seconds = time.perf_counter() - start
    log.info("wrote %s", output)
    return report


def load_model(
    path: str | os.PathLike, arch: str | None = None, layout: str | None = None, ema: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Our deploy-form model (eval mode) holding the weights of a training or deploy checkpoint in any layout.

    Args:
        path: checkpoint file.
        arch: a registered model name; default: the checkpoint's ``arch`` entry if it fits, else inferred.
        layout: input layout; default: detected.
        ema: load the EMA weights.

    Returns:
        ``(model, info)``; ``info`` has ``arch``, ``num_classes``, ``layout``, ``in_chans``, ``deployed_input``
        (whether the file already held the deploy form), ``blocks_fused`` and the checkpoint's ``extras``.

    Raises:
        CheckpointError, ConversionError: unreadable file, or not a standalone RepVGG/VGG classifier.
    """
    contents = read_checkpoint(path, ema=ema)
    sd, hint = contents.state_dict, contents.extras.get("arch")
    deploy, report = convert_state_dict(sd, arch, layout, None, verify=False, inplace=True, arch_hint=hint)
    vgg = report.layout == "torchvision"
    if not vgg:
        src = LAYOUTS[report.out_layout]
        blocks = find_blocks(deploy, src)
        if not is_standalone(deploy, blocks, src):
            raise ConversionError(f"{path}: not a standalone RepVGG classifier or backbone (it holds other modules "
                                  "too); use convert_state_dict for whole-model checkpoints")
        deploy = rename_layout(deploy, src, LAYOUTS["ours"], blocks, True)
    resolved = _resolve_arch(deploy, arch, hint, vgg, deploy=True)
    if resolved is None:
        raise ConversionError(f"{path}: cannot tell the architecture from the weights; pass arch=")
    model = resolved.build(True)
    missing, unexpected = model.load_state_dict(deploy, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise ConversionError(f"{path}: weights do not fit {resolved.name} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    model.eval()
    info = {"arch": resolved.name, "num_classes": resolved.num_classes, "layout": report.layout,
            "in_chans": resolved.in_chans, "deployed_input": report.blocks_fused == 0,
            "blocks_fused": report.blocks_fused, "extras": contents.extras}
    return model, info
