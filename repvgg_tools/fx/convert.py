"""Convert a user's own model: build it from their code, load their checkpoint, fuse with the graph fuser, verify.

This is the only place the toolkit runs user code, and only on an explicit ``package.module:factory`` the user names
(``repvgg-convert --model``). The library function is :func:`convert_user_model`; see ``docs/fuser.md``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..contract import rtol_for
from ..conversion.layouts import ConversionError
from ..io.checkpoint import read_checkpoint, save_checkpoint
from ..io.paths import check_outputs
from ..reparam import reparameterize
from ..verify import VerifyResult, verify_equivalence
from .fuser import example_inputs_for

__all__ = ["load_factory", "convert_user_model", "FusionVerificationError"]

log = logging.getLogger(__name__)


class FusionVerificationError(RuntimeError):
    """The fused model does not reproduce the training model within tolerance; nothing was written."""

    def __init__(self, result: VerifyResult) -> None:
        super().__init__(f"verification failed: {result}")
        self.result = result


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """Import ``package.module:factory`` (``factory`` may be dotted, e.g. ``Net.small``) and return the callable.

    Raises:
        ConversionError: the spec is malformed, the module cannot be imported or has no such attribute.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConversionError(f"--model must look like package.module:factory, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - user code: report any failure in one line
        raise ConversionError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConversionError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConversionError(f"{spec} is not callable")
    return obj


def convert_user_model(
    factory: str | Callable[..., nn.Module], input: str | os.PathLike, output: str | os.PathLike, *,
    export_onnx: str | os.PathLike | None = None, force: bool = False, verify: bool = True, ema: bool = False,
    input_shape: Sequence[int] | None = None, factory_kwargs: Mapping[str, Any] | None = None,
    rtol: float | None = None,
) -> dict:
    """Build the user's model, load ``input``, fuse it (blocks' methods, Conv->BN folds, the graph fuser), verify in
    float64 against the training model, and save the deploy checkpoint (and optionally a plain ONNX).

    The deploy checkpoint holds ``state_dict`` (the fused model's keys: a folded conv keeps its key, ``fused_*``
    convs replace the branches the graph fuser merged), ``fuse_report`` (text) and the input's non-training entries
    (epoch, args...). To load it,
    build the model, ``reparameterize`` it once from the same training checkpoint (the structure depends on it) or
    use the ONNX file, which needs no code.

    Args:
        factory: ``package.module:factory`` (imported: runs the user's code) or a callable returning the model.
        input: training checkpoint (any container :func:`repvgg_tools.io.checkpoint.read_checkpoint` reads).
        output: deploy checkpoint path (``.pth``/``.pt`` or ``.safetensors``).
        export_onnx: also write a plain fp32 ONNX here.
        force: overwrite existing outputs.
        verify: compare the fused model with the training model (float64, random inputs); refuse to write beyond
            ``rtol``.
        rtol: tolerance of that check, ``max|a-b| / max|b|``; default: the contract's for the model's dtype
            (:func:`repvgg_tools.contract.rtol_for`: fp32 1e-5, float64 1e-12, fp16 5e-3, bf16 4e-2; the loosest of
            its floating-point parameters' dtypes), since the fused weights are stored rounded to that dtype.
        ema: load the checkpoint's EMA weights.
        input_shape: ``(N, C, H, W)`` of the model's input; default ``(1, C, 64, 64)`` sized from its first Conv2d.
        factory_kwargs: keyword arguments for the factory.

    Returns:
        A report: ``fused``/``unfused`` (from the graph fuser), ``verify`` (a dict or ``None``), ``output``,
        ``onnx``.

    Raises:
        ConversionError: bad factory, checkpoint that does not fit the model, or no input shape to work with.
        CheckpointError: unreadable input, an output exists without ``force``, is the input, or both outputs name
            one file.
        FusionVerificationError: the fused model misses the tolerance (nothing written).
    """
    output = Path(output)
    check_outputs({"output": output, "export_onnx": export_onnx}, (input,), force)  # before any work or write
    build = load_factory(factory) if isinstance(factory, str) else factory
    try:
        model = build(**dict(factory_kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - user code
        raise ConversionError(f"the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConversionError(f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
    contents = read_checkpoint(input, ema=ema)
    missing, unexpected = _load(model, contents.state_dict)
    if missing or unexpected:
        raise ConversionError(f"{input}: the checkpoint does not fit the model: missing {_preview(missing)}, "
                              f"unexpected {_preview(unexpected)}")
    model.eval()
    example = _example(model, input_shape)
    deploy, report = reparameterize(model, example_inputs=(example,), report=True)
    result = None
    if verify:
        rtol = _model_rtol(model) if rtol is None else rtol
        result = verify_equivalence(copy.deepcopy(model).double(), copy.deepcopy(deploy).double(),
                                    tuple(example.shape), dtype=torch.float64, rtol=rtol, num_inputs=2)
        if not result.passed:
            raise FusionVerificationError(result)
    state = {k: v.detach().contiguous() for k, v in deploy.state_dict().items()}
    extras = {k: v for k, v in contents.extras.items() if isinstance(v, (str, int, float, bool, dict, list))}
    if output.suffix == ".safetensors":
        saved = save_checkpoint({**state, "fuse_report": str(report)}, output, force=force)
    else:
        saved = save_checkpoint({"state_dict": state, "fuse_report": str(report), **extras}, output, force=force)
    onnx_path = None
    if export_onnx is not None:
        from ..export.onnx import export_onnx as to_onnx
        from ..export.onnx import save_onnx

        proto = to_onnx(deploy, tuple(example.shape[2:]), in_chans=example.shape[1])
        onnx_path = str(save_onnx(proto, export_onnx, force=force))
    log.info("converted %s -> %s: %s", input, saved, report)
    return {"fused": len(report.fused), "unfused": [f"{w}: {why}" for w, why in report.unfused],
            "skipped": [f"{w}: {why}" for w, why in report.skipped], "verify": result.as_dict() if result else None,
            "output": str(saved), "onnx": onnx_path, "report": report}


def _model_rtol(model: nn.Module) -> float:
    """The contract's tolerance for the dtypes of ``model``'s floating-point parameters and buffers (the loosest)."""
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} or {torch.float32}
    try:
        return max(rtol_for(d) for d in dtypes)
    except ValueError as exc:
        raise ConversionError(f"cannot verify the model: {exc} (pass rtol)") from None


def _load(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConversionError(f"the checkpoint does not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    return list(result.missing_keys), list(result.unexpected_keys)


def _preview(keys: list[str], n: int = 4) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _example(model: nn.Module, input_shape: Sequence[int] | None) -> torch.Tensor:
    if input_shape is not None:
        param = next(model.parameters(), None)
        like = {"dtype": param.dtype, "device": param.device} if param is not None else {}
        return torch.randn(*input_shape, generator=torch.Generator().manual_seed(0)).to(**like)
    candidates = example_inputs_for(model)
    for (x,) in candidates:
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # noqa: BLE001 - try the next guess
            continue
    raise ConversionError("cannot guess the model's input shape: pass input_shape (N, C, H, W)")

