"""The export pipeline behind ``repvgg-export``: a checkpoint of any layout to a verified fp32/fp16/int8 ONNX model.

:func:`export_checkpoint` loads (and, for a training checkpoint, converts and verifies) the model, optionally cuts
a feature backbone, exports, converts the precision, verifies on onnxruntime and writes the file and its JSON
report only when the check passes. It takes the parsed arguments of :mod:`repvgg_tools.cli.export`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["UsageError", "load_deploy_model", "features_model", "export_checkpoint"]


class UsageError(ValueError):
    """Bad arguments or input (exit code 2)."""


def load_deploy_model(path: str, arch: str | None = None, layout: str | None = None, ema: bool = False, *,
                      model_kwargs: dict | None = None, bn_eps: float | None = None) -> tuple[nn.Module, dict]:
    """``(deploy-form model in eval mode, info)`` from a checkpoint of any layout (:func:`repvgg_tools.conversion.api.
    load_model`: ours, official RepVGG, timm, MMPretrain, torchvision VGG; training or deploy form).

    A training checkpoint is converted with verification: the deploy weights are checked in float64 against the
    training form built from the checkpoint's own tensors (``info["conversion"]`` has the figures), so the ONNX
    model, checked against this deploy model, is checked against the input checkpoint.

    Raises:
        VerificationError: the fused weights do not reproduce the training form.
    """
    from ..conversion.api import load_model

    model, info = load_model(path, arch=arch, layout=layout, ema=ema, model_kwargs=model_kwargs, bn_eps=bn_eps,
                             verify=True)
    return model.eval(), dict(info)


def features_model(model, arch: str | None, out_indices):
    """A multi-output backbone over ``model``'s weights: ``create_model(arch, features_only=True)`` when ``arch``
    is registered, else ``model`` cut at its ``feature_info`` levels (torchvision's feature extractor).

    Raises:
        UsageError: the model has no feature levels, or bad ``out_indices``.
    """
    from ..models import create_model, is_model
    from ..models.features import load_backbone_weights, normalize_out_indices

    try:
        indices = normalize_out_indices(out_indices)
        if arch and is_model(arch):
            backbone = create_model(arch, deploy=True, features_only=True, out_indices=indices)
            load_backbone_weights(backbone, model.state_dict())
            return backbone.eval()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    info = getattr(model, "feature_info", None)
    if info is None:
        raise UsageError(f"{type(model).__name__} has no feature levels (feature_info) to export with --features")
    from torchvision.models.feature_extraction import create_feature_extractor

    names = info.module_name(list(indices))
    extractor = create_feature_extractor(model, return_nodes={n: f"feat{i}" for i, n in enumerate(names)})
    return _ListOutput(extractor).eval()


class _ListOutput(nn.Module):
    """Turns a feature extractor's dict output into a list (ONNX outputs feat0, feat1, ...)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.inner(x)
        return [out[f"feat{i}"] for i in range(len(out))]


def _in_chans(model) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise UsageError("the model has no Conv2d layer")


def _verify_inputs(args, in_chans: int, samples: int) -> list:
    """Random standard-normal batches; with a dynamic batch the first batch has one sample, the rest the others."""
    gen = torch.Generator().manual_seed(0)
    if args.dynamic_batch:
        sizes = [1, samples - 1] if samples > 1 else [1]
    else:
        sizes = [args.batch] * max(1, -(-samples // args.batch))
    return [torch.randn(n, in_chans, args.input_size, args.input_size, generator=gen) for n in sizes if n > 0]


def export_checkpoint(args: argparse.Namespace) -> tuple[dict, bool]:
    """Run the export described by parsed arguments; returns ``(report, verification passed)``.

    Raises:
        UsageError, CheckpointError, ExportError, PrecisionError: input or usage problems (exit 2).
    """
    from ..export.onnx import export_onnx, model_io, onnx_session, op_counts, save_onnx, torch_outputs, verify_onnx
    from ..export.precision import to_fp16
    from ..io.checkpoint import CheckpointError, atomic_write
    from ..io.paths import check_outputs

    out = Path(args.output)
    if not Path(args.checkpoint).exists():
        raise CheckpointError(f"{args.checkpoint}: no such file")
    check_outputs({"OUTPUT": out, "--json": args.json}, (args.checkpoint,), args.force)
    if args.input_size < 8 or args.batch < 1 or args.calib_samples < 1:
        raise UsageError("--input-size must be >= 8, --batch and --calib-samples >= 1")
    if args.out_indices and not args.features:
        raise UsageError("--out-indices needs --features")
    if args.fp16_io and args.precision != "fp16":
        raise UsageError("--fp16-io needs --precision fp16")
    floors_given = any(v is not None for v in (args.int8_min_top1, args.int8_min_cosine,
                                               args.int8_min_feature_cosine, args.int8_max_rel_error))
    if args.precision != "int8" and (args.calib or args.calib_dir or args.calib_samples != 64 or floors_given
                                     or args.calib_method != "minmax" or args.reduce_range):
        raise UsageError("calibration options and int8 floors need --precision int8")
    samples = args.verify_samples or (128 if args.precision == "int8" else 8)
    if samples < 1:
        raise UsageError("--verify-samples must be at least 1")
    torch.manual_seed(0)
    timings = {}
    start = time.perf_counter()
    kwargs = {"output_stride": args.output_stride} if args.output_stride else None
    model, info = load_deploy_model(args.checkpoint, args.arch, args.layout, args.ema, model_kwargs=kwargs,
                                    bn_eps=args.bn_eps)
    arch = args.arch or info.get("arch")
    digits_shaped = args.precision == "int8" and _int8_is_digits_model(model, args.input_size)
    if args.features:
        model = features_model(model, arch, args.out_indices)
    in_chans = _in_chans(model)
    calib_source = _int8_source(args, in_chans, samples, digits_shaped) if args.precision == "int8" else None
    qat = info.get("extras", {}).get("quant") if args.precision == "int8" else None
    if qat is not None and (args.calib_method != "minmax" or args.reduce_range):
        raise UsageError("the checkpoint holds quantization-aware-trained scales: --calib-method and --reduce-range "
                         "do not apply")
    timings["load"] = time.perf_counter() - start
    t = time.perf_counter()
    proto = export_onnx(model, args.input_size, batch=args.batch, dynamic_batch=args.dynamic_batch,
                        opset=args.opset, in_chans=in_chans, simplify_graph=args.simplify)
    timings["export"] = time.perf_counter() - t
    report = {"checkpoint": str(args.checkpoint), "output": str(out), "arch": arch, "precision": args.precision,
              "opset": args.opset, "input_size": args.input_size, "in_chans": in_chans,
              "dynamic_batch": args.dynamic_batch, "features": args.features, "simplified": args.simplify,
              "conversion": info.get("conversion")}
    t = time.perf_counter()
    passed = True
    if args.precision == "fp16":
        proto = to_fp16(proto, keep_io_types=not args.fp16_io)
    elif args.precision == "int8":
        proto, int8_report = _export_int8(args, model, proto, calib_source, qat)
        report["calibration"] = {"source": int8_report.source, "samples": int8_report.calibration_samples,
                                 "method": int8_report.method, "reduce_range": args.reduce_range,
                                 "synthetic": int8_report.synthetic}
        if args.verify:
            report["verification"] = int8_report.to_dict()
            passed = int8_report.passed
            timings["verify"] = int8_report.seconds["verify"]
    timings["precision"] = time.perf_counter() - t - timings.get("verify", 0.0)
    report.update(ops=dict(sorted(op_counts(proto).items())), nodes=len(proto.graph.node), io=model_io(proto))
    if args.verify and args.precision != "int8":
        t = time.perf_counter()
        inputs, note = _verify_inputs(args, in_chans, samples), "random standard-normal inputs"
        ref = torch_outputs(model, inputs)
        result = verify_onnx(onnx_session(proto), model, args.precision, inputs, ref)
        result["inputs"] = note
        report["verification"] = result
        passed = result["passed"]
        timings["verify"] = time.perf_counter() - t
    if passed:
        t = time.perf_counter()
        save_onnx(proto, out, force=args.force)
        timings["write"] = time.perf_counter() - t
        report["file_bytes"] = out.stat().st_size
    report["seconds"] = {k: round(v, 3) for k, v in timings.items()}
    report["seconds"]["total"] = round(time.perf_counter() - start, 3)
    report["written"] = passed
    if args.json:
        text = json.dumps(report, indent=2, default=str)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text + "\n"), force=args.force)
    return report, passed


def _int8_is_digits_model(model, input_size: int) -> bool:
    from ..export.int8 import is_digits_model

    return is_digits_model(model, input_size)


def _int8_source(args, in_chans: int, samples: int, digits_shaped: bool):
    """The calibration source the flags name (:class:`repvgg_tools.export.int8.CalibrationSource`).

    Raises:
        UsageError: no source given for a model that is not shaped like our digits models.
    """
    from ..export.int8 import MIN_HELD_OUT, CalibrationSource

    least = MIN_HELD_OUT if args.verify else 0
    if args.calib_dir:
        return CalibrationSource.folder(args.calib_dir, args.input_size, in_chans, args.calib_samples, samples,
                                        min_held_out=least)
    if args.calib == "synthetic":
        return CalibrationSource.noise(args.input_size, in_chans, args.calib_samples, samples)
    if args.calib == "digits" or digits_shaped:
        return CalibrationSource.digits(args.input_size, in_chans, args.calib_samples, samples, min_held_out=least)
    raise UsageError("int8 needs calibration images from the model's domain: pass --calib-dir DIR (the digits "
                     "default is only for 10-class models with 1 or 3 input channels; --calib synthetic runs a "
                     "smoke test whose check says nothing about accuracy)")


def _export_int8(args, model, proto, source, qat):
    """:func:`repvgg_tools.export.int8.export_int8` with the floors the flags set."""
    from ..export.int8 import Int8Floors, export_int8

    defaults = Int8Floors()
    floors = Int8Floors(*(default if value is None else value for value, default in (
        (args.int8_min_top1, defaults.min_top1), (args.int8_min_cosine, defaults.min_cosine),
        (args.int8_min_feature_cosine, defaults.min_feature_cosine),
        (args.int8_max_rel_error, defaults.max_rel_error))))
    return export_int8(model, proto, source, method=args.calib_method, floors=floors,
                       reduce_range=args.reduce_range, verify=args.verify, qat=qat)
