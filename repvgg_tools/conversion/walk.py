"""The two walks of a conversion: RepVGG blocks (any layout, whole detectors included) and VGG conv+BN pairs.

Each walks the input's keys once, in order: a block's tensors are validated and fused together (through
:mod:`repvgg_tools.conversion.branches`), every other tensor is carried; with ``inplace`` consumed tensors are dropped
and their memory-mapped pages returned to the OS. :mod:`repvgg_tools.conversion.api` calls them; they return a
:class:`Converted`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..io.memory import release_pages
from .arch import Arch, ArchHints, resolve_arch
from .branches import BN_STATS, BlockParts, Branch, block_parts, check_finite, fuse_into, read_bn
from .check import ConversionReport, Verifier
from .layouts import (
    LAYOUTS,
    Block,
    ConversionError,
    Layout,
    block_key,
    find_blocks,
    find_vgg_pairs,
    is_standalone,
    map_block_prefix,
    map_head_key,
    rename_layout,
    vgg_index_map,
)

__all__ = ["Converted", "Job", "convert_repvgg", "convert_vgg", "param_count"]

PROGRESS_MIN_PARAMS = 20_000_000
OURS = LAYOUTS["ours"]


@dataclass
class Converted:
    """A conversion's output, with what :func:`load_model` reuses instead of working it out again."""

    state_dict: dict[str, Tensor]
    report: ConversionReport
    arch: Arch | None = None
    ours_names: dict[str, str] = field(default_factory=dict)  # output key -> the same tensor's name in our layout



@dataclass
class Job:
    """One conversion's input and settings, shared by the RepVGG and VGG walks."""

    sd: dict[str, Tensor]
    eps: float
    inplace: bool
    release: bool
    verify: bool
    progress: bool
    shared: set[str]  # keys whose memory another key reaches: never written in place, never released
    dtype: torch.dtype = torch.float32

    def keys(self, desc: str):
        """The input keys in order, with a progress bar for large models."""
        items = list(self.sd)
        if not self.progress or sum(v.numel() for v in self.sd.values()) < PROGRESS_MIN_PARAMS:
            return items
        from tqdm import tqdm

        # disable=None: only on a terminal, so logs and captured stderr stay clean
        return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, leave=False, disable=None)

    def fuse(self, parts: BlockParts, kernel_key: str, verifier: Verifier | None, where: str) -> tuple[Tensor, Tensor]:
        """The fused ``(kernel, bias)`` of a block, written over its main kernel when that is safe."""
        w = parts.main.kernel
        kernel = w if self.inplace and kernel_key not in self.shared else torch.empty_like(w)
        bias = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        if verifier is None:
            fuse_into(kernel, bias, parts, self.eps, where)
            return kernel, bias
        probe = verifier.before(parts)
        # the unrounded float64 fusion, for the verifier only (without verification nothing float64 is kept)
        exact = verifier.exact_buffers(w)
        fuse_into(kernel, bias, parts, self.eps, where, exact)
        verifier.after(probe, kernel, bias, exact, where)
        return kernel, bias

    def consume(self, keys: dict[str, str], keep: tuple[str, ...]) -> None:
        """With ``inplace``: drop a fused unit's input tensors (roles in ``keep`` live on in the output), and give
        their pages back to the OS where no other tensor reaches them."""
        if not self.inplace:
            return
        for role, key in keys.items():
            t = self.sd.pop(key)
            if self.release and role not in keep and key not in self.shared:
                release_pages(t)


def convert_repvgg(job: Job, src: Layout, dst: Layout, detected, arch, hints, size) -> Converted:
    sd = job.sd
    blocks = find_blocks(sd, src)
    if not blocks:
        raise ConversionError(f"no RepVGG blocks in the {src.name} layout found"
                              + (f" (the keys look like the {detected} layout)" if detected else ""))
    if dst.name != src.name and not (src.modelable and dst.modelable):
        raise ConversionError(f"a {src.name} checkpoint converts to its own layout only, not {dst.name}")
    standalone = is_standalone(sd, blocks, src)
    training = [b for b in blocks if not b.deployed]
    context = _block_context(sd, blocks, src, hints) if standalone and src.modelable else {}
    # validates every block before anything changes
    parts = {b.prefix: block_parts(sd, b, *context.get(b.prefix, (None, None))) for b in training}
    qa_guessed = not context and any(p.post_bn is not None for p in parts.values())
    job.dtype = next(iter(parts.values())).main.kernel.dtype if parts else _first_float_dtype(sd)
    report = ConversionReport(src.name, dst.name, blocks_already_deployed=len(blocks) - len(training))
    ours_prefix = {b.prefix: map_block_prefix(b.prefix, src, OURS, standalone) for b in blocks}
    model_arch = canon = None
    if standalone and src.modelable and len(training) in (0, len(blocks)):
        canon = rename_layout(sd, src, OURS, blocks, True)
        canon_blocks = [Block(ours_prefix[b.prefix], {r: block_key(ours_prefix[b.prefix], OURS.key(r)) for r in b.keys},
                              b.deployed, OURS) for b in blocks]
        model_arch = resolve_arch(canon, arch, hints, False, deploy=not training, blocks=canon_blocks)
        if model_arch is not None:
            report.arch, report.num_classes = model_arch.name, model_arch.num_classes
    elif arch is not None:
        raise ConversionError(f"--arch {arch} does not apply: the checkpoint holds more than a standalone RepVGG "
                              "classifier; convert without --arch (its blocks are verified one by one)")
    verifier = Verifier(model_arch, canon, job.eps, size) if job.verify and training else None
    del canon
    where = {k: b for b in blocks for k in b.keys.values()}
    aux = re.compile(rf"(.*\.)?{src.aux}") if src.aux else None
    out: dict[str, Tensor] = {}
    ours: dict[str, str] = {}
    dropped_aux = 0
    done: set[str] = set()
    for key in job.keys("fusing"):
        b = where.get(key)
        if b is None:
            if aux is not None and aux.match(key) and training:
                dropped_aux += 1
                job.consume({"": key}, ())
                continue
            check_finite(key, sd[key])
            name = (map_head_key(key, src, dst) if standalone else None) or key
            out[name] = sd.pop(key) if job.inplace else sd[key]
            ours[name] = (map_head_key(key, src, OURS) if standalone else None) or key
            report.tensors_carried += 1
            continue
        if b.prefix in done:
            continue
        done.add(b.prefix)
        for role, k in b.keys.items():
            if b.deployed or not role.endswith("conv.weight"):  # conv kernels are checked after fusion
                check_finite(k, sd[k])
        new_prefix = map_block_prefix(b.prefix, src, dst, standalone)
        written = {role: sd[b.keys[role]] for role in b.keys if role.startswith("se.") or b.deployed}
        if not b.deployed:
            written["reparam.weight"], written["reparam.bias"] = job.fuse(
                parts.pop(b.prefix), b.keys["branch_3x3.conv.weight"], verifier, b.prefix or "<root>")
            report.blocks_fused += 1
        for role, t in written.items():
            name = block_key(new_prefix, dst.key(role))
            out[name], ours[name] = t, block_key(ours_prefix[b.prefix], OURS.key(role))
        job.consume(b.keys, ("branch_3x3.conv.weight",) + tuple(r for r in b.keys if r.startswith("se.")))
    if qa_guessed:
        report.notes.append("QARepVGG blocks carry no identity tensors: outside a standalone classifier a block is "
                            "taken to have its identity branch when its 3x3 kernel keeps the channels (groups 1, "
                            "stride 1), the reference rule")
    if dropped_aux:
        report.notes.append(f"dropped {dropped_aux} tensors of the auxiliary classifiers (training only; the "
                            f"{src.name} deploy form has none)")
    if verifier is not None:
        verifier.finish(report, lambda: {ours[k]: v for k, v in out.items()})
    return Converted(out, report, model_arch, ours)


def _block_context(sd: Mapping[str, Tensor], blocks: list[Block], layout: Layout,
                   hints: ArchHints) -> dict[str, tuple[int, int]]:
    """``prefix -> (input channels, stride)`` of the blocks of a standalone RepVGG, from their order and the stride
    schedule (QARepVGG's identity branch has no tensors: these tell whether a block has one)."""
    from ..models.features import output_stride_schedule

    kw = hints.model_kwargs
    try:
        strides, _ = output_stride_schedule(kw.get("strides", (2,) * 5), kw.get("dilations", (1,) * 5),
                                            kw.get("output_stride"))
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"the checkpoint's model_kwargs {dict(kw)} do not fit a RepVGG ({exc})") from None
    positions = sorted((layout.parse_position(b.prefix)[1:], b) for b in blocks)
    context, in_ch = {}, None
    for (stage, j), b in positions:
        key = b.keys["reparam.weight" if b.deployed else "branch_3x3.conv.weight"]
        w = sd[key]
        if w.dim() != 4:
            raise ConversionError(f"{key} has shape {tuple(w.shape)}, not (C_out, C_in/groups, k, k)")
        in_ch = w.shape[1] if in_ch is None else in_ch
        context[b.prefix] = (in_ch, strides[stage] if j == 0 and stage < len(strides) else 1)
        in_ch = w.shape[0]
    return context


def _first_float_dtype(sd: Mapping[str, Tensor]) -> torch.dtype:
    return next((v.dtype for v in sd.values() if torch.is_floating_point(v)), torch.float32)


def convert_vgg(job: Job, arch, hints, out_layout, detected, size) -> Converted:
    if out_layout not in (None, "torchvision", "ours"):
        raise ConversionError(f"a VGG converts to the torchvision layout, not {out_layout!r}")
    sd = job.sd
    pairs = find_vgg_pairs(sd)
    if not pairs and detected != "torchvision":
        raise ConversionError(f"--layout torchvision matches nothing here: no features.N conv followed by a "
                              f"BatchNorm (the keys look like the {detected or 'unknown'} layout)")
    report = ConversionReport("torchvision", "torchvision")
    standalone = all(p.root == "features." for p in pairs) and all(
        k.startswith(("features.", "classifier.")) for k in sd)
    model_arch = resolve_arch(sd, arch, hints, True, deploy=not pairs) if standalone else None
    if model_arch is not None:
        report.arch, report.num_classes = model_arch.name, model_arch.num_classes
    elif arch is not None and not standalone:
        raise ConversionError(f"--arch {arch} does not apply: the checkpoint holds more than a VGG classifier; "
                              "convert without --arch (its conv+BatchNorm pairs are verified one by one)")
    parts: dict[str, tuple] = {}
    for p in pairs:
        w = sd[p.conv("weight")]
        keys = {f"bn.{n}": p.bn(n) for n in ("weight", "bias", "running_mean", "running_var") if p.bn(n) in sd}
        bn = read_bn(sd, keys, "bn", w.shape[0], p.bn("")[:-1])
        parts[p.conv("weight")] = (p, BlockParts(Branch(w, sd.get(p.conv("bias")), bn), None, False, None, 1))
    job.dtype = sd[pairs[0].conv("weight")].dtype if pairs else _first_float_dtype(sd)
    verifier = Verifier(model_arch, sd, job.eps, size) if job.verify and pairs else None
    rename = vgg_index_map(sd, pairs)
    consumed = {p.bn(n) for p in pairs for n in ("weight", "bias") + BN_STATS} | {p.conv("bias") for p in pairs}
    out: dict[str, Tensor] = {}
    for key in job.keys("folding"):
        if key in consumed:
            continue
        if key not in parts:
            check_finite(key, sd[key])
            out[rename.get(key, key)] = sd[key]
            report.tensors_carried += 1
            continue
        p, unit = parts.pop(key)
        unit_keys = {"conv.weight": key, "conv.bias": p.conv("bias"),
                     **{f"bn.{n}": p.bn(n) for n in ("weight", "bias") + BN_STATS}}
        unit_keys = {role: k for role, k in unit_keys.items() if k in sd}
        for k in unit_keys.values():
            if k != key:
                check_finite(k, sd[k])
        kernel, bias = job.fuse(unit, key, verifier, p.conv("")[:-1])
        out[rename[key]], out[rename[key][: -len("weight")] + "bias"] = kernel, bias
        report.blocks_fused += 1
        job.consume(unit_keys, ("conv.weight",))
    if job.inplace:
        sd.clear()
    if verifier is not None:
        verifier.finish(report, lambda: out)
    return Converted(out, report, model_arch, {k: k for k in out})


def param_count(sd: Mapping[str, Tensor]) -> int:
    """Parameters of a state dict (BatchNorm statistics excluded)."""
    return sum(v.numel() for k, v in sd.items() if isinstance(v, Tensor) and not k.endswith(BN_STATS))
