"""Checkpoint conversion at the tensor level: training-form RepVGG / VGG-BN state dicts -> deploy form, verified.

No model is built to convert: each block's tensors go through :mod:`repvgg_tools.fusion` (the functions
:class:`~repvgg_tools.blocks.RepVGGBlock` uses), a few output channels at a time, and with ``inplace`` the fused
kernel overwrites the 3x3 kernel it came from, so a memory-mapped checkpoint converts in about its own size of RAM.
Verification builds the two models on the ``meta`` device and points them at the same tensors (no copies), runs a
few small random inputs, and compares; a state dict that is not a standalone classifier (a detector holding a RepVGG
backbone) is verified block by block instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, read_checkpoint, release_pages, save_checkpoint
from .convert_parts import (
    BN_STATS,
    ConversionError,
    Verifier,
    block_parts,
    check_finite,
    fuse_unit,
    param_count,
    read_bn,
    resolve_arch,
)
from .layouts import (
    LAYOUT_NAMES,
    LAYOUTS,
    Layout,
    LayoutError,
    VggPair,
    block_key,
    detect_layout,
    find_blocks,
    find_vgg_pairs,
    is_standalone,
    map_block_prefix,
    map_head_key,
    rename_layout,
    vgg_index_map,
)
from .verify import DEFAULT_RTOL

__all__ = ["ConversionError", "VerificationError", "ConversionReport", "convert_state_dict", "convert_file",
           "load_model"]

log = logging.getLogger(__name__)

PROGRESS_MIN_PARAMS = 20_000_000


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
    params_before = param_count(work)
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
    report.params_before, report.params_after = params_before, param_count(out)
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


def _convert_repvgg(sd, src: Layout, dst: Layout, detected, arch, hint, verify, inplace, eps, size, progress, release):
    blocks = find_blocks(sd, src)
    if not blocks:
        raise ConversionError(f"no RepVGG blocks in the {src.name} layout found"
                              + (f" (the keys look like the {detected} layout)" if detected else ""))
    standalone = is_standalone(sd, blocks, src)
    training = [b for b in blocks if not b.deployed]
    parts = {b.prefix: block_parts(sd, b) for b in training}  # validates every block before anything changes
    report = ConversionReport(src.name, dst.name, blocks_already_deployed=len(blocks) - len(training))
    model_arch = canon = None
    if standalone and len(training) in (0, len(blocks)):
        canon = rename_layout(sd, src, LAYOUTS["ours"], blocks, True)
        model_arch = resolve_arch(canon, arch, hint, False, deploy=not training)
        if model_arch is not None:
            report.arch, report.num_classes = model_arch.name, model_arch.num_classes
    elif arch is not None:
        log.warning("--arch %s ignored: the checkpoint holds more than a RepVGG classifier", arch)
    verifier = None
    if verify and training:
        verifier = Verifier(model_arch, canon, sd[training[0].keys["branch_3x3.conv.weight"]], size)
    del canon
    where = {k: b for b in blocks for k in b.keys.values()}
    out: dict[str, Tensor] = {}
    done: set[str] = set()
    for key in _progress(list(sd), sum(v.numel() for v in sd.values()), progress, "fusing"):
        b = where.get(key)
        if b is None:
            check_finite(key, sd[key])
            out[(map_head_key(key, src, dst) if standalone else None) or key] = sd.pop(key) if inplace else sd[key]
            report.tensors_carried += 1
            continue
        if b.prefix in done:
            continue
        done.add(b.prefix)
        for role, k in b.keys.items():
            if b.deployed or not role.endswith("conv.weight"):  # conv kernels are checked after fusion
                check_finite(k, sd[k])
        new_prefix = map_block_prefix(b.prefix, src, dst, standalone)
        for role in [r for r in b.keys if r.startswith("se.") or b.deployed]:
            out[block_key(new_prefix, dst.key(role))] = sd[b.keys[role]]
        if not b.deployed:
            main, side, identity = parts.pop(b.prefix)
            kernel, bias = fuse_unit(main, side, identity, eps, inplace, verifier, b.prefix or "<root>")
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
    model_arch = resolve_arch(sd, arch, hint, True, deploy=not pairs) if standalone else None
    if model_arch is not None:
        report.arch, report.num_classes = model_arch.name, model_arch.num_classes
    elif arch is not None and not standalone:
        log.warning("--arch %s ignored: the checkpoint holds more than a VGG classifier", arch)
    parts: dict[str, tuple[VggPair, tuple]] = {}
    for p in pairs:
        w = sd[p.conv("weight")]
        keys = {f"bn.{n}": p.bn(n) for n in ("weight", "bias", "running_mean", "running_var") if p.bn(n) in sd}
        parts[p.conv("weight")] = (p, (w, sd.get(p.conv("bias")), read_bn(sd, keys, "bn", w.shape[0], p.conv(""))))
    verifier = Verifier(model_arch, sd, sd[pairs[0].conv("weight")], size) if verify and pairs else None
    rename = vgg_index_map(sd, pairs)
    consumed = {p.bn(n) for p in pairs for n in ("weight", "bias") + BN_STATS} | {p.conv("bias") for p in pairs}
    out: dict[str, Tensor] = {}
    for key in _progress(list(sd), sum(v.numel() for v in sd.values()), progress, "folding"):
        if key in consumed:
            continue
        if key not in parts:
            check_finite(key, sd[key])
            out[rename.get(key, key)] = sd[key]
            report.tensors_carried += 1
            continue
        p, main = parts.pop(key)
        for k in [key, p.conv("bias")] + [p.bn(n) for n in ("weight", "bias") + BN_STATS]:
            if k in sd:
                check_finite(k, sd[k])
        kernel, bias = fuse_unit(main, None, None, eps, inplace, verifier, p.conv("")[:-1])
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
    resolved = resolve_arch(deploy, arch, hint, vgg, deploy=True)
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
