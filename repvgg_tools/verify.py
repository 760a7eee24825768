"""The model-level equivalence check (training vs deploy form on random inputs), for tests, examples and users."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .contract import FP32_RTOL as DEFAULT_RTOL  # re-exported: the fp32 contract
from .contract import flatten_outputs, max_errors

__all__ = ["VerifyResult", "compare_outputs", "verify_equivalence", "randomize_batchnorm", "flatten_outputs",
           "DEFAULT_RTOL"]

log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    """Outcome of an equivalence check. ``max_rel`` is ``max|a-b| / max|b|`` (relative to the output scale)."""

    max_abs: float
    max_rel: float
    rtol: float
    passed: bool
    inputs: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"max abs err {self.max_abs:.3e}, max rel err {self.max_rel:.3e} (tolerance {self.rtol:.0e}): "
                f"{verdict}")


def compare_outputs(candidate, reference) -> tuple[float, float]:
    """``(max_abs, max_rel)`` between two outputs of the same structure; relative to ``max|reference|``.

    :func:`repvgg_tools.contract.max_errors` under its historical name.
    """
    return max_errors(candidate, reference)


@torch.no_grad()
def verify_equivalence(
    reference: nn.Module | Callable,
    candidate: nn.Module | Callable,
    input_shape: Sequence[int] = (2, 3, 64, 64),
    *,
    inputs: Sequence[Tensor] | None = None,
    num_inputs: int = 2,
    rtol: float = DEFAULT_RTOL,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> VerifyResult:
    """Run both models on the same random (or given) inputs and compare relative to the output scale.

    Modules are put in eval mode (train-mode BatchNorm is the most common false alarm). Inputs are standard normal.

    Args:
        reference: the original (training-form) model or any callable.
        candidate: the converted model or callable.
        input_shape: ``(N, C, H, W)`` of the random inputs.
        inputs: explicit inputs instead of random ones.
        num_inputs: how many random batches.
        rtol: pass when ``max_rel <= rtol``.
        dtype, device: of the random inputs; default: those of the reference's first floating-point parameter
            (float32 on CPU for a callable or a model without parameters).
        seed: RNG seed for reproducible inputs.
    """
    start = time.perf_counter()
    for m in (reference, candidate):
        if isinstance(m, nn.Module):
            m.eval()
    if isinstance(reference, nn.Module) and (dtype is None or device is None):
        param = next((p for p in reference.parameters() if p.is_floating_point()), None)
        if param is not None:
            dtype, device = dtype or param.dtype, device if device is not None else param.device
    if inputs is None:
        gen = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(*input_shape, generator=gen, dtype=torch.float64).to(dtype or torch.float32)
                  for _ in range(num_inputs)]
    max_abs = max_rel = 0.0
    for x in inputs:
        x = x.to(device) if device is not None else x
        a, r = compare_outputs(candidate(x), reference(x))
        max_abs, max_rel = max(max_abs, a), max(max_rel, r)
    result = VerifyResult(max_abs, max_rel, rtol, max_rel <= rtol, len(inputs), time.perf_counter() - start)
    log.info("verification: %s", result)
    return result


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, in place, so equivalence tests can fail.

    Freshly built BNs (mean 0, var 1, gamma 1, beta 0) hide folding bugs; trained ones never look like that.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features

            def rand(lo: float, hi: float, n: int = n, like: Tensor | None = None) -> Tensor:
                t = torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo) + lo
                return t.to(like.dtype if like is not None else torch.float32)

            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64).to(m.running_mean.dtype))
                m.running_var.copy_(rand(0.5, 2.0, like=m.running_var))
            if m.weight is not None:
                m.weight.copy_(rand(0.5, 1.5, like=m.weight))
                m.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64).mul(0.2).to(m.bias.dtype))
    return model
