"""The conversion report and the verifier that fills it.

The verifier is independent of the fusion code and exact: the reference is the training-form forward computed from
the tensors *read* (training branches, declared BatchNorm epsilon), the candidate the deploy-form forward computed
from the tensors *written*, both in float64. The only difference left is the rounding of the written weights to
their dtype, so one tolerance per dtype holds for every correct conversion (an fp32 forward alone is up to 1e-4 away
from its own float64 forward on some models) and fails for a wrong one.

Two modes: ``model`` (the whole model on two small random images) when the architecture is known, else ``blocks``
(each fused conv against its branches on a 7x7 input: a detector holding a RepVGG backbone, a custom network).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arch import Arch
from .branches import BlockParts, BranchBN
from .verify import compare_outputs

__all__ = ["ConversionReport", "VerificationError", "Verifier", "DTYPE_RTOL", "default_rtol", "block_reference"]

# max|a-b| / max|b| that a correct conversion meets in each weight dtype: float64 forwards differ only by the
# rounding of the written weights (about the dtype's unit roundoff per layer, growing with depth)
DTYPE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def default_rtol(dtype: torch.dtype) -> float:
    """The verification tolerance for weights of ``dtype`` (float32's for dtypes not listed)."""
    return DTYPE_RTOL.get(dtype, DTYPE_RTOL[torch.float32])


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
    bn_eps: float = 1e-5
    bn_eps_source: str = "default"
    verify_mode: str | None = None  # "model" (whole model, small input) or "blocks" (block by block)
    max_abs: float | None = None
    max_rel: float | None = None
    rtol: float = DTYPE_RTOL[torch.float32]
    rtol_source: str = "float32 weights"
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
            verdict = "ok" if self.passed else "FAILED"
            lines.append(f"verify:      {self.verify_mode}, float64: max abs err {self.max_abs:.3e}, max rel err "
                         f"{self.max_rel:.3e} (tolerance {self.rtol:.0e}, {self.rtol_source}) {verdict} in "
                         f"{self.verify_seconds:.2f} s")
        if self.replaced:
            lines.append(f"read as data: {', '.join(self.replaced)}")
        if self.dropped:
            lines.append(f"dropped:     {', '.join(self.dropped)}")
        lines += [f"note:        {n}" for n in self.notes]
        lines.append(f"time:        {self.seconds:.2f} s (load {self.load_seconds:.2f}, convert "
                     f"{self.convert_seconds:.2f}, verify {self.verify_seconds:.2f}, save {self.save_seconds:.2f})")
        return lines


class VerificationError(RuntimeError):
    """The converted weights do not reproduce the original outputs within tolerance. ``report`` has the numbers."""

    def __init__(self, report: ConversionReport) -> None:
        super().__init__(f"verification failed: max rel err {report.max_rel:.3e} > tolerance {report.rtol:.0e} "
                         f"({report.rtol_source})")
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
    """``sd`` as float64 copies, with the ``num_batches_tracked`` buffers it lacks."""
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


class Verifier:
    """Checks a conversion in float64 and times itself (see the module docstring).

    Args:
        arch: the architecture (``model`` mode), or ``None`` (``blocks`` mode).
        train_sd: the training tensors under our names (``model`` mode); read before any in-place fusion.
        eps: the declared BatchNorm epsilon.
        size: side of the random images in ``model`` mode.
    """

    def __init__(self, arch: Arch | None, train_sd: Mapping[str, Tensor] | None, eps: float, size: int) -> None:
        self.arch, self.eps, self.mode = arch, eps, ("model" if arch is not None else "blocks")
        self.gen = torch.Generator().manual_seed(0)
        self.max_abs = self.max_rel = self.seconds = 0.0
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
        a, r = compare_outputs(out, ref)
        self.max_abs, self.max_rel = max(self.max_abs, a), max(self.max_rel, r)

    def before(self, parts: BlockParts) -> tuple[Tensor, Tensor] | None:
        """``blocks`` mode: the reference of one block, taken before its tensors may be overwritten."""
        if self.mode != "blocks":
            return None
        with self._timed():
            x = self._randn(2, parts.in_channels, 7, 7)
            return x, block_reference(x, parts, self.eps)

    def after(self, probe: tuple[Tensor, Tensor] | None, kernel: Tensor, bias: Tensor) -> None:
        """``blocks`` mode: compare the written ``(kernel, bias)`` with the reference ``probe``."""
        if probe is None:
            return
        x, ref = probe
        with self._timed():
            groups = x.shape[1] // kernel.shape[1]
            self._record(F.conv2d(x, _f64(kernel), _f64(bias), padding=kernel.shape[-1] // 2, groups=groups), ref)

    def finish(self, report: ConversionReport, deploy_sd: Callable[[], Mapping[str, Tensor]]) -> None:
        """Run the deploy model on the written tensors (``model`` mode) and fill ``report``'s verification fields."""
        if self.mode == "model":
            with self._timed():
                outs = run_float64(self.arch, True, deploy_sd(), self.inputs, self.eps)
                for out, ref in zip(outs, self.ref, strict=True):
                    self._record(out, ref)
        report.verify_mode, report.verify_seconds = self.mode, self.seconds
        report.max_abs, report.max_rel = self.max_abs, self.max_rel
