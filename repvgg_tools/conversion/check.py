"""The conversion report and the verifier that fills it.

A conversion is checked in two parts that cannot hide each other (docs/contract.md):

(a) *the fusion is exact*: the training-form forward computed from the tensors *read* (training branches, declared
    BatchNorm epsilon) against the deploy-form forward computed from the *unrounded float64* fused tensors, both in
    float64. Nothing is rounded to the weights' dtype on either side, so a correct fusion lands at 1e-15..1e-13 for
    every dtype and one tolerance (:data:`repvgg_tools.contract.FUSION_RTOL`) holds; a wrong one (eps, a dropped
    branch, a wrong statistic, one weight off by 1e-4) lands far above it.
(b) *the rounding is right*: every written kernel and bias equals that float64 fusion rounded once to its dtype,
    bit for bit, checked after the whole walk (so a later in-place write through shared memory is caught too).

The forward with the *written* (rounded) weights against the training form is reported as information only: it
measures rounding noise amplified by the network (a correct timm ``repvgg_d2se`` with randomized BatchNorms is up to
2e-5 from its float64 training form with fp32 weights), which no fixed tolerance separates from a wrong fusion.

Two modes: ``model`` (the whole model on two small random images) when the architecture is known, else ``blocks``
(each fused conv against its branches on a 7x7 input: a detector holding a RepVGG backbone, a custom network).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contract import FUSION_RTOL, max_errors
from .arch import Arch
from .branches import CHUNK_ELEMENTS, BlockParts, BranchBN

__all__ = ["ConversionReport", "VerificationError", "Verifier", "FUSION_RTOL", "block_reference"]



@dataclass
class ConversionReport:
    """What a conversion did; the verification fields are ``None`` without verification.

    ``max_abs``/``max_rel`` are check (a), judged against ``rtol``: the training form against the deploy form with
    the unrounded float64 fused tensors. ``rounding_mismatches`` is check (b): the written tensors that are not that
    fusion rounded once (``rounding_checked`` were compared). ``rounded_max_abs``/``rounded_max_rel`` are the deploy
    form with the written, rounded tensors against the training form: information, not judged. ``passed`` needs both
    checks.
    """

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
    bn_eps: float = 1e-5
    bn_eps_source: str = "default"
    verify_mode: str | None = None  # "model" (whole model, small input) or "blocks" (block by block)
    max_abs: float | None = None
    max_rel: float | None = None
    rtol: float = FUSION_RTOL
    rtol_source: str = "default"
    rounding_checked: int = 0
    rounding_mismatches: list[str] = field(default_factory=list)
    rounded_max_abs: float | None = None
    rounded_max_rel: float | None = None
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
    replaced: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fusion_passed(self) -> bool:
        """Check (a): the float64 fusion reproduces the training form within ``rtol``."""
        return self.max_rel is not None and self.max_rel <= self.rtol

    def summary_lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        layouts = self.layout if self.layout == self.out_layout else f"{self.layout} -> {self.out_layout}"
        lines = [f"layout:      {layouts}", f"arch:        {self.arch or 'unknown (blocks only)'}",
                 f"blocks:      {self.blocks_fused} fused, {self.blocks_already_deployed} already deployed, "
                 f"{self.tensors_carried} other tensors carried",
                 f"parameters:  {self.params_before:,} -> {self.params_after:,} ({self.dtype})",
                 f"bn eps:      {self.bn_eps:g} ({self.bn_eps_source})"]
        if self.max_rel is None:
            lines.append("verify:      " + ("skipped" if self.blocks_fused else "nothing to verify (nothing fused)"))
        else:
            lines.append(f"verify:      {self.verify_mode}, float64: fusion vs training form: max abs err "
                         f"{self.max_abs:.3e}, max rel err {self.max_rel:.3e} (tolerance {self.rtol:.0e}, "
                         f"{self.rtol_source}) {'ok' if self.fusion_passed else 'FAILED'} in "
                         f"{self.verify_seconds:.2f} s")
            bad = self.rounding_mismatches
            lines.append(f"rounding:    {self.rounding_checked - len(bad)} of {self.rounding_checked} written tensors "
                         f"are the float64 fusion rounded once to {self.dtype}: "
                         + ("ok" if not bad else f"FAILED ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})"))
            if self.rounded_max_rel is not None:
                lines.append(f"written:     float64 with the written {self.dtype} weights vs training form: max abs "
                             f"err {self.rounded_max_abs:.3e}, max rel err {self.rounded_max_rel:.3e} (information: "
                             "rounding amplified by the network, not judged)")
        if self.replaced:
            lines.append(f"read as data: {', '.join(self.replaced)}")
        if self.dropped:
            lines.append(f"dropped:     {', '.join(self.dropped)}")
        lines += [f"note:        {n}" for n in self.notes]
        lines.append(f"time:        {self.seconds:.2f} s (load {self.load_seconds:.2f}, convert "
                     f"{self.convert_seconds:.2f}, verify {self.verify_seconds:.2f}, save {self.save_seconds:.2f})")
        return lines


class VerificationError(RuntimeError):
    """The fusion does not reproduce the original outputs within tolerance (check (a)), or a written tensor is not
    the float64 fusion rounded once (check (b)). ``report`` has the numbers."""

    def __init__(self, report: ConversionReport) -> None:
        why = []
        if not report.fusion_passed:
            why.append(f"the fusion is not exact: max rel err {report.max_rel:.3e} > tolerance {report.rtol:.0e} "
                       f"({report.rtol_source})")
        if report.rounding_mismatches:
            bad = report.rounding_mismatches
            why.append(f"{len(bad)} written tensors are not the float64 fusion rounded once ({', '.join(bad[:3])}"
                       f"{', ...' if len(bad) > 3 else ''})")
        super().__init__("verification failed: " + "; ".join(why))
        self.report = report


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _bn(x: Tensor, bn: BranchBN, eps: float) -> Tensor:
    return F.batch_norm(x, _f64(bn.running_mean), _f64(bn.running_var), _f64(bn.weight), _f64(bn.bias), False, 0.0,
                        eps)


def block_reference(x: Tensor, parts: BlockParts, eps: float) -> Tensor:
    """A training block's branch sum (with QARepVGG's BatchNorm after it; before the activation) at stride 1 and
    dilation 1, in float64, computed with ``F.conv2d``/``F.batch_norm`` only (no fusion code)."""
    out = None
    for branch in (parts.main, parts.side):
        if branch is not None:
            y = F.conv2d(x, _f64(branch.kernel), _f64(branch.bias), padding=branch.kernel.shape[-1] // 2,
                         groups=x.shape[1] // branch.kernel.shape[1])
            y = y if branch.bn is None else _bn(y, branch.bn, eps)
            out = y if out is None else out + y
    if parts.identity:
        out = out + (x if parts.identity_bn is None else _bn(x, parts.identity_bn, eps))
    return out if parts.post_bn is None else _bn(out, parts.post_bn, eps)


def _float64_state_dict(model: nn.Module, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` as float64 (copies, except of tensors already float64), with the ``num_batches_tracked`` buffers it
    lacks."""
    out = {k: (v.detach().to(torch.float64) if torch.is_floating_point(v) else v) for k, v in sd.items()}
    for k, v in model.state_dict().items():
        if k not in out and k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=v.dtype)
    return out


@torch.no_grad()
def run_float64(arch: Arch, deploy: bool, sd: Mapping[str, Tensor], inputs: list[Tensor], eps: float) -> list[Tensor]:
    """Outputs of ``arch`` holding float64 copies of ``sd``'s tensors, BatchNorm epsilon ``eps``, on ``inputs``."""
    with torch.device("meta"):
        model = arch.build(deploy)
    model.load_state_dict(_float64_state_dict(model, sd), strict=True, assign=True)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
    model.eval()
    return [model(x) for x in inputs]


def _chunks(t: Tensor):
    flat = t.detach().reshape(-1)
    return (flat[start:start + CHUNK_ELEMENTS] for start in range(0, flat.numel(), CHUNK_ELEMENTS))


def _rounded_once(written: Tensor, exact: Tensor) -> bool:
    """Whether ``written`` is ``exact`` (float64) rounded once to ``written.dtype``, compared a chunk at a time so
    the rounded copy stays small."""
    return written.shape == exact.shape and all(
        torch.equal(w, e.to(written.dtype)) for w, e in zip(_chunks(written), _chunks(exact), strict=True))


def _digest(t: Tensor, dtype: torch.dtype) -> bytes:
    """BLAKE2b of the bytes of ``t`` rounded to ``dtype`` (no copy when it already is), a chunk at a time."""
    h = hashlib.blake2b(digest_size=32)
    for chunk in _chunks(t):
        h.update(chunk.to(dtype).contiguous().cpu().view(torch.uint8).numpy())
    return h.digest()


@dataclass
class _Fused:
    """One fused unit as the verifier keeps it until :meth:`Verifier.finish`: the written tensors (the output's own,
    so a later write into their memory shows), and what they must equal: the float64 fusion itself (``model`` mode,
    which also runs the deploy model on it) or the digest of its rounding (``blocks`` mode, so nothing float64 stays
    alive between blocks)."""

    where: str
    kernel: Tensor
    bias: Tensor
    exact: tuple[Tensor, Tensor] | None = None
    digests: tuple[bytes, bytes] | None = None


class Verifier:
    """Checks a conversion in float64 and times itself (see the module docstring).

    Per fused unit the caller runs :meth:`before` (before the unit's tensors may be overwritten), fuses, writing the
    unrounded float64 fusion into :meth:`exact_buffers`, then :meth:`after`; :meth:`finish` once the walk is done.

    Args:
        arch: the architecture (``model`` mode), or ``None`` (``blocks`` mode).
        train_sd: the training tensors under our names (``model`` mode); read before any in-place fusion.
        eps: the declared BatchNorm epsilon.
        size: side of the random images in ``model`` mode.
    """

    def __init__(self, arch: Arch | None, train_sd: Mapping[str, Tensor] | None, eps: float, size: int) -> None:
        self.arch, self.eps, self.mode = arch, eps, ("model" if arch is not None else "blocks")
        self.gen = torch.Generator().manual_seed(0)
        self.max_abs = self.max_rel = self.rounded_max_abs = self.rounded_max_rel = self.seconds = 0.0
        self.fused: list[_Fused] = []
        if arch is not None:  # reference outputs now, before in-place fusion overwrites the 3x3 kernels
            with self._timed():
                self.inputs = [self._randn(2, arch.in_chans, size, size)]  # two random images
                self.ref = run_float64(arch, False, train_sd, self.inputs, eps)

    @contextlib.contextmanager
    def _timed(self):
        start = time.perf_counter()
        try:
            with torch.no_grad():
                yield
        finally:
            self.seconds += time.perf_counter() - start

    def _randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def _record(self, out, ref) -> None:
        a, r = max_errors(out, ref)
        self.max_abs, self.max_rel = max(self.max_abs, a), max(self.max_rel, r)

    def _record_rounded(self, out, ref) -> None:
        a, r = max_errors(out, ref)
        self.rounded_max_abs, self.rounded_max_rel = max(self.rounded_max_abs, a), max(self.rounded_max_rel, r)

    @staticmethod
    def exact_buffers(kernel: Tensor) -> tuple[Tensor, Tensor]:
        """Empty float64 ``(kernel, bias)`` shaped like the fusion of a block whose main kernel is ``kernel``."""
        return (torch.empty(kernel.shape, dtype=torch.float64, device=kernel.device),
                torch.empty(kernel.shape[0], dtype=torch.float64, device=kernel.device))

    def before(self, parts: BlockParts) -> tuple[Tensor, Tensor] | None:
        """``blocks`` mode: the reference of one block, taken before its tensors may be overwritten."""
        if self.mode != "blocks":
            return None
        with self._timed():
            x = self._randn(2, parts.in_channels, 7, 7)
            return x, block_reference(x, parts, self.eps)

    def after(self, probe: tuple[Tensor, Tensor] | None, kernel: Tensor, bias: Tensor, exact: tuple[Tensor, Tensor],
              where: str) -> None:
        """Take one fused unit: the written ``(kernel, bias)`` and the unrounded float64 fusion ``exact``.

        ``blocks`` mode compares both with the reference ``probe`` now and keeps only the digest of ``exact`` rounded;
        ``model`` mode keeps ``exact`` for :meth:`finish`.
        """
        if self.mode == "model":
            self.fused.append(_Fused(where, kernel, bias, exact=exact))
            return
        x, ref = probe
        with self._timed():
            groups = x.shape[1] // kernel.shape[1]
            pad = kernel.shape[-1] // 2
            self._record(F.conv2d(x, exact[0], exact[1], padding=pad, groups=groups), ref)
            self._record_rounded(F.conv2d(x, _f64(kernel), _f64(bias), padding=pad, groups=groups), ref)
            digests = (_digest(exact[0], kernel.dtype), _digest(exact[1], bias.dtype))
            self.fused.append(_Fused(where, kernel, bias, digests=digests))

    def _rounding_mismatches(self) -> list[str]:
        """Check (b) over every unit, after the walk: the names of written tensors that are not their float64
        fusion rounded once (as they are now, so a later write into their memory counts)."""
        bad = []
        for u in self.fused:
            for name, written, i in (("kernel", u.kernel, 0), ("bias", u.bias, 1)):
                ok = (_rounded_once(written, u.exact[i]) if u.exact is not None
                      else _digest(written, written.dtype) == u.digests[i])
                if not ok:
                    bad.append(f"{u.where} {name}")
        return bad

    def finish(self, report: ConversionReport, deploy_sd: Callable[[], Mapping[str, Tensor]]) -> None:
        """Check (b) on every written tensor; in ``model`` mode run the deploy model on the float64 fusion (check
        (a)) and then on the written tensors (information); fill ``report``'s verification fields."""
        with self._timed():
            report.rounding_mismatches = self._rounding_mismatches()
            report.rounding_checked = 2 * len(self.fused)
            if self.mode == "model":
                written = deploy_sd()
                exact = {id(t): u.exact[i] for u in self.fused for i, t in enumerate((u.kernel, u.bias))}
                outs = run_float64(self.arch, True, {k: exact.get(id(v), v) for k, v in written.items()}, self.inputs,
                                   self.eps)
                for out, ref in zip(outs, self.ref, strict=True):
                    self._record(out, ref)
                # the float64 fusion is no longer needed: drop it before the written tensors get float64 copies, so
                # peak memory stays that of one float64 deploy state dict
                del exact, outs
                for u in self.fused:
                    u.exact = None
                for out, ref in zip(run_float64(self.arch, True, written, self.inputs, self.eps), self.ref,
                                    strict=True):
                    self._record_rounded(out, ref)
        self.fused = []
        report.verify_mode, report.verify_seconds = self.mode, self.seconds
        report.max_abs, report.max_rel = self.max_abs, self.max_rel
        report.rounded_max_abs, report.rounded_max_rel = self.rounded_max_abs, self.rounded_max_rel
