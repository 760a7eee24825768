"""Checkpoint conversion at the tensor level: training-form RepVGG / VGG-BN state dicts -> deploy form, verified.

This module orchestrates; the pieces live by responsibility:

- :mod:`repvgg_tools.conversion.layouts`: key names of each project and their detection (which keys form a block);
- :mod:`repvgg_tools.conversion.arch`: the architecture the tensors describe (named, from metadata, or inferred);
- :mod:`repvgg_tools.conversion.branches`: a block's branch tensors, validated, fused a chunk at a time through
  :mod:`repvgg_tools.fusion.core` (the functions :class:`~repvgg_tools.blocks.RepVGGBlock` uses);
- :mod:`repvgg_tools.conversion.check`: the report, and the float64 verifier that fills it;
- :mod:`repvgg_tools.conversion.walk`: the walk over a state dict's keys (RepVGG blocks, VGG conv+BN pairs).

No model is built to convert. One walk over the keys fuses each block and carries every other tensor; with
``inplace`` the fused kernel overwrites the 3x3 kernel it came from and consumed tensors give their pages back, so
a memory-mapped checkpoint converts in about its own size of RAM.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..contract import FUSION_RTOL
from ..io.checkpoint import check_output_path, read_checkpoint, save_checkpoint
from ..io.memory import overlaps_itself, shared_memory_keys, tensors_in
from .arch import ArchHints, checkpoint_hints
from .check import ConversionReport, VerificationError
from .layouts import LAYOUT_NAMES, LAYOUTS, ConversionError, detect_layout, rename_layout
from .walk import Converted, Job, convert_repvgg, convert_vgg, param_count

__all__ = ["ConversionError", "VerificationError", "ConversionReport", "convert_state_dict", "convert_file",
           "load_model", "DEFAULT_BN_EPS"]

log = logging.getLogger(__name__)

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_BN_EPS = 1e-5  # torch.nn.BatchNorm2d's, which every supported project uses unless configured otherwise
OURS = LAYOUTS["ours"]


# --------------------------------------------------------------------------------------------------- conversion
def convert_state_dict(
    sd: Mapping[str, Tensor],
    arch: str | None = None,
    layout: str | None = None,
    out_layout: str | None = None,
    verify: bool = True,
    *,
    inplace: bool = False,
    hints: ArchHints | None = None,
    rtol: float | None = None,
    bn_eps: float | None = None,
    input_size: int | None = None,
    progress: bool = False,
    release_mapped: bool = False,
    others: Any = (),
) -> tuple[dict[str, Tensor], ConversionReport]:
    """Convert a training-form RepVGG (any layout) or VGG-BN state dict to its deploy form.

    Args:
        sd: name -> tensor, container and ``module.`` prefixes already removed
            (see :func:`repvgg_tools.io.checkpoint.read_checkpoint`).
        arch: a registered model name the weights must fit; default: the checkpoint's own (``hints``) if it fits,
            else inferred from shapes.
        layout: input layout (one of ``LAYOUT_NAMES``); default: detected. A forced layout must match the keys.
        out_layout: output layout; default: the input's.
        verify: check the conversion (:mod:`repvgg_tools.conversion.check`) and raise :class:`VerificationError` when
            the float64 fusion differs from the training form beyond ``rtol`` on random inputs, or a written tensor
            is not that fusion rounded once.
        inplace: reuse the input's tensors: fused kernels overwrite the 3x3 kernels (unless a kernel shares memory
            with another tensor) and ``sd`` is emptied as blocks fuse (pass a dict you own; memory-mapped tensors are
            safe, the file is never written).
        hints: what the checkpoint's metadata says (:func:`~repvgg_tools.conversion.arch.checkpoint_hints`): arch,
            builder arguments, BatchNorm epsilon.
        rtol: tolerance of the fusion check, ``max|a-b| / max|b|`` between the training form and the deploy form
            with the unrounded float64 fused tensors, both in float64; default
            :data:`repvgg_tools.contract.FUSION_RTOL` (1e-10), whatever the weights' dtype.
        bn_eps: BatchNorm epsilon the model was trained with; default: ``hints.bn_eps``, else 1e-5.
        input_size: side of the random verification inputs (default 64 for RepVGG, 32 for VGG).
        progress: show a progress bar on stderr for large models.
        release_mapped: with ``inplace``, the tensors come from ``load_checkpoint(mmap=True)``: give the pages of
            consumed branch tensors back to the OS as blocks fuse (see
            :func:`~repvgg_tools.io.checkpoint.release_pages`).
        others: whatever else of the file is kept (extras): tensors in it that share memory with ``sd``'s are never
            overwritten by an in-place fusion.

    Returns:
        ``(deploy_state_dict, report)``.

    Raises:
        ConversionError: not a RepVGG/VGG-BN state dict, a forced layout or arch that does not match, corrupt
            weights (NaN/Inf, negative variance), or weights that do not fit ``arch``.
        VerificationError: the fusion differs beyond ``rtol``, or a written tensor is not the fusion rounded once.
    """
    converted = _convert(sd, arch, layout, out_layout, verify, inplace, hints or ArchHints(), rtol, bn_eps,
                         input_size, progress, release_mapped, tensors_in(others))
    return converted.state_dict, converted.report


def _bn_eps(bn_eps: float | None, hints: ArchHints) -> tuple[float, str]:
    eps, source = ((bn_eps, "given") if bn_eps is not None else (hints.bn_eps, "checkpoint metadata")
                   if hints.bn_eps is not None else (DEFAULT_BN_EPS, "default of torch BatchNorm2d"))
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ConversionError(f"BatchNorm eps must be a number in (0, 1), got {eps!r}")
    return float(eps), source


def _convert(sd, arch, layout, out_layout, verify, inplace, hints, rtol, bn_eps, input_size, progress,
             release_mapped, others: list[Tensor] = ()) -> Converted:
    start = time.perf_counter()
    if not isinstance(sd, Mapping) or not sd:
        raise ConversionError("empty state dict")
    for name in (layout, out_layout):
        if name is not None and name not in LAYOUT_NAMES:
            raise ConversionError(f"unknown layout {name!r}; choose from {', '.join(LAYOUT_NAMES)}")
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise ConversionError(f"{k}: not a tensor ({type(v).__name__})")
        if v.layout != torch.strided or v.is_quantized or not (v.dtype in WEIGHT_DTYPES or not (
                v.is_floating_point() or v.is_complex())):
            kind = str(v.dtype).replace("torch.", "") + ("" if v.layout == torch.strided else f" {v.layout}")
            raise ConversionError(f"{k}: a {kind} tensor; weights must be dense float16, bfloat16, float32 or "
                                  "float64")
    eps, eps_source = _bn_eps(bn_eps, hints)
    detected = detect_layout(sd)
    vgg = layout == "torchvision" or (layout in (None, "ours") and detected == "torchvision")
    layout = layout or detected
    if layout is None:
        preview = ", ".join(list(sd)[:3])
        raise ConversionError(f"no RepVGG blocks or VGG conv+BatchNorm layers found; not a RepVGG/VGG checkpoint "
                              f"(keys: {preview}, ...)")
    work = sd if inplace else dict(sd)
    shared = _guard_views(work, others)
    params_before = param_count(work)
    job = Job(work, eps, inplace, release_mapped and inplace, verify, progress, shared if inplace else set())
    if vgg:
        converted = convert_vgg(job, arch, hints, out_layout, detected, input_size or 32)
    else:
        if out_layout == "torchvision":
            raise ConversionError("the torchvision layout is for VGG models; RepVGG converts to ours, official, "
                                  "timm or mmpretrain")
        converted = convert_repvgg(job, LAYOUTS[layout], LAYOUTS[out_layout or layout], detected, arch, hints,
                                    input_size or 64)
    report = converted.report
    report.params_before, report.params_after = params_before, param_count(converted.state_dict)
    report.dtype, report.bn_eps, report.bn_eps_source = str(job.dtype).replace("torch.", ""), eps, eps_source
    # one tolerance for every dtype: the fusion and both forwards are float64, the rounding is checked exactly
    report.rtol, report.rtol_source = (rtol, "given") if rtol is not None else (FUSION_RTOL, "default, any dtype")
    report.convert_seconds = time.perf_counter() - start - report.verify_seconds
    report.seconds = time.perf_counter() - start
    if report.max_rel is not None:
        report.passed = report.fusion_passed and not report.rounding_mismatches
        log.info("verification (%s): fusion max abs %.3e, max rel %.3e; %d of %d written tensors rounded once; "
                 "written weights max rel %.3e (information)", report.verify_mode, report.max_abs, report.max_rel,
                 report.rounding_checked - len(report.rounding_mismatches), report.rounding_checked,
                 report.rounded_max_rel)
        if not report.passed:
            raise VerificationError(report)
    return converted


COPY_BUDGET = 256 << 20  # bytes of copies of self-overlapping views allowed beyond the checkpoint's own size


def _guard_views(sd: dict[str, Tensor], others: list[Tensor]) -> set[str]:
    """Make the state dict safe to fuse in place: self-overlapping views (stride 0, folded strides) are replaced by
    copies, and the keys whose memory another tensor reaches (in ``sd`` or anywhere else in the file, ``others``)
    are returned: they are never written in place nor released (nor are the copies).

    The copies are bounded: in all, no more than the file's stored bytes or :data:`COPY_BUDGET`, whichever is
    larger, so a tiny file declaring an expanded tensor of billions of elements is refused, not materialized.

    Raises:
        ConversionError: a view that would take more than that to copy.
    """
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (*sd.values(), *others)
                if t.device.type == "cpu"}
    budget = max(COPY_BUDGET, sum(storages.values()))
    copied = set()
    for key, t in sd.items():
        if t.numel() and overlaps_itself(t):
            need = t.numel() * t.element_size()
            if need > budget:
                raise ConversionError(
                    f"{key}: a view that repeats its stored data ({t.numel()} elements of shape {tuple(t.shape)} "
                    f"over stride {t.stride()}); too large to copy, refused (re-save it with .contiguous())")
            budget -= need
            sd[key] = t.contiguous()
            copied.add(key)
    everything: dict[str, Tensor] = dict(sd)
    everything.update({f"\0other {i}": t for i, t in enumerate(others)})
    return copied | {k for k in shared_memory_keys(everything) if k in sd}


# ------------------------------------------------------------------------------------------------------- files
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
    rtol: float | None = None,
    bn_eps: float | None = None,
) -> ConversionReport:
    """Convert a checkpoint file to its deploy form, atomically (what ``repvgg-convert`` runs).

    The input is memory-mapped and converted in place in memory (never on disk). Training files with configs,
    argument namespaces and logs load as plain data (:mod:`repvgg_tools.io.safe_pickle`). Non-model entries (epoch,
    arch, args, ...) are carried over as plain data, optimizer and scheduler state is dropped. The container is kept
    (a bare state dict stays bare); ``.safetensors`` output gets the state dict, with the other entries as string
    metadata.

    Args:
        input, output: paths; ``output`` must differ from ``input``.
        arch, layout, out_layout, verify, rtol, bn_eps: see :func:`convert_state_dict`.
        ema: convert the EMA weights (``model_ema``, ``state_dict_ema``, ``ema``).
        force: overwrite an existing ``output``.
        progress: progress bar on stderr for large models.

    Returns:
        The report, with load/save times and paths.

    Raises:
        CheckpointError: unreadable input, or an output that cannot be written.
        ConversionError: see :func:`convert_state_dict`; also when there is nothing to fuse.
        VerificationError: nothing is written.
    """
    start = time.perf_counter()
    input, output = Path(input), Path(output)
    check_output_path(output, force, (input,))
    contents = read_checkpoint(input, ema=ema)
    load_seconds = time.perf_counter() - start
    deploy, report = convert_state_dict(
        contents.state_dict, arch, layout, out_layout, verify, inplace=True, hints=checkpoint_hints(contents.extras),
        rtol=rtol, bn_eps=bn_eps, progress=progress, release_mapped=contents.mapped,
        others=tensors_in(contents.extras),
    )
    if not report.blocks_fused:
        what = (f"all {report.blocks_already_deployed} RepVGG blocks are already in deploy form"
                if report.blocks_already_deployed else "no conv+BatchNorm pair to fold")
        raise ConversionError(f"{input}: nothing to fuse: {what}; the file needs no conversion")
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
    report.replaced = list(contents.replaced)
    report.seconds = time.perf_counter() - start
    log.info("wrote %s", output)
    return report


def load_model(
    path: str | os.PathLike, arch: str | None = None, layout: str | None = None, ema: bool = False, *,
    deploy: bool = True, model_kwargs: Mapping[str, Any] | None = None, bn_eps: float | None = None,
    verify: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Our model (eval mode) holding the weights of a training or deploy checkpoint in any layout.

    The architecture is ``arch``, else the checkpoint's own (``arch`` entry, official ``config.MODEL.ARCH``, timm
    ``args.model``) when the weights fit it, else read from shapes. Builder arguments the weights cannot show
    (``output_stride``, strides, dilation) come from ``model_kwargs``, else the checkpoint's ``model_kwargs`` entry.

    Args:
        path: checkpoint file.
        arch: a registered model name.
        layout: input layout; default: detected.
        ema: load the EMA weights.
        deploy: return the deploy form (fused; the default), or the training form (needs a training checkpoint).
        model_kwargs: builder arguments, overriding the checkpoint's.
        bn_eps: BatchNorm epsilon the weights were trained with (default: checkpoint metadata, else 1e-5).
        verify: check a conversion in float64 (see :func:`convert_state_dict`); ``info["conversion"]`` then has
            ``max_abs``, ``max_rel`` and ``rtol``.

    Returns:
        ``(model, info)``; ``info`` has ``arch``, ``num_classes``, ``layout``, ``in_chans``, ``deployed_input``
        (whether the file already held the deploy form), ``blocks_fused``, ``model_kwargs``, ``bn_eps``,
        ``conversion`` and the checkpoint's ``extras``.

    Raises:
        CheckpointError, ConversionError: unreadable file, not a standalone RepVGG/VGG classifier, a training form
            asked of a deploy checkpoint, or strides/dilation that neither the weights nor the metadata tell.
        VerificationError: with ``verify``, the fused weights do not reproduce the training form.
    """
    contents = read_checkpoint(path, ema=ema)
    hints = checkpoint_hints(contents.extras)
    if model_kwargs is not None:
        hints.model_kwargs = dict(model_kwargs)
    train_sd = contents.state_dict
    # the training form needs the tensors as read: fuse into new tensors then
    converted = _convert(train_sd, arch, layout, None, verify, deploy, hints, None, bn_eps, None, False, False,
                         tensors_in(contents.extras))
    report, resolved = converted.report, converted.arch
    if resolved is None:
        if report.layout != "torchvision" and not LAYOUTS[report.layout].modelable:
            raise ConversionError(f"{path}: a {report.layout} checkpoint has no model here; use repvgg-convert")
        raise ConversionError(f"{path}: not a standalone RepVGG/VGG classifier or backbone, or its architecture "
                              "cannot be told from the weights; pass arch= (whole-model checkpoints: use "
                              "convert_state_dict)")
    if resolved.unknown:
        raise ConversionError(f"{path}: {resolved.unknown}")
    if deploy:
        model, sd = resolved.build(True), {converted.ours_names[k]: v for k, v in converted.state_dict.items()}
    else:
        if not report.blocks_fused:
            raise ConversionError(f"{path}: holds the deploy form; there is no training form to build")
        src = LAYOUTS[report.layout] if report.layout != "torchvision" else None
        model = resolved.build(False)
        sd = rename_layout(train_sd, src, OURS) if src is not None else train_sd
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise ConversionError(f"{path}: weights do not fit {resolved.name} (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]})")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = report.bn_eps
    model.eval()
    info = {"arch": resolved.name, "num_classes": resolved.num_classes, "layout": report.layout,
            "in_chans": resolved.in_chans, "deployed_input": report.blocks_fused == 0,
            "blocks_fused": report.blocks_fused, "model_kwargs": dict(hints.model_kwargs),
            "bn_eps": report.bn_eps, "extras": contents.extras,
            "conversion": None if report.max_rel is None else {"max_abs": report.max_abs, "max_rel": report.max_rel,
                                                               "rtol": report.rtol, "mode": report.verify_mode}}
    return model, info
