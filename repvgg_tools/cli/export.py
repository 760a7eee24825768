"""``repvgg-export CHECKPOINT OUT.onnx``: a training or deploy checkpoint to a verified fp32/fp16/int8 ONNX model.

Exit codes: 0 success, 1 failed verification (nothing written), 2 usage or input error. Errors are one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["main", "build_parser", "load_deploy_model", "features_model", "export_checkpoint"]

from .common import EXIT_VERIFY, Parser, error, run_command

log = logging.getLogger("repvgg_tools.cli.export")


class UsageError(ValueError):
    """Bad arguments or input (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="repvgg-export", description="Export a RepVGG/VGG checkpoint (training or deploy form, any "
                "layout) to a plain, verified ONNX model at fp32, fp16 or int8 (Q/DQ).")
    p.add_argument("checkpoint", help="training or deploy checkpoint (.pth/.pt/.ckpt/.safetensors)")
    p.add_argument("output", help="ONNX file to write")
    p.add_argument("--arch", help="architecture name (default: from the checkpoint or inferred from its tensors)")
    p.add_argument("--layout", choices=("ours", "official", "timm", "mmpretrain", "torchvision"),
                   help="checkpoint key layout (default: detected)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="output stride the model was built with "
                   "(default: the checkpoint's model_kwargs; needed when a stage runs at stride 1 and no metadata "
                   "says so)")
    p.add_argument("--bn-eps", type=float, metavar="EPS", help="BatchNorm epsilon the model was trained with "
                   "(default: the checkpoint's bn_eps entry, else 1e-5)")
    p.add_argument("--input-size", type=int, default=224, metavar="N", help="input side (default 224)")
    p.add_argument("--batch", type=int, default=1, help="batch of the example input (fixed batch with "
                   "--no-dynamic-batch; default 1)")
    p.add_argument("--no-dynamic-batch", dest="dynamic_batch", action="store_false",
                   help="fixed batch instead of a symbolic batch axis")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="precision stored in the ONNX (default fp32)")
    p.add_argument("--fp16-io", action="store_true", help="fp16: keep float16 inputs/outputs (default: float32 IO)")
    calib = p.add_mutually_exclusive_group()
    calib.add_argument("--calib", choices=("digits", "synthetic"),
                       help="int8 calibration set: the built-in digits set (the default only for a 10-class model "
                       "with 1 or 3 input channels, our digits demo's shape), or synthetic random images (smoke "
                       "tests only: the int8 check then says nothing about accuracy)")
    calib.add_argument("--calib-dir", metavar="DIR", help="int8 calibration images from the model's domain (any "
                       "depth; resized, centre-cropped, ImageNet-normalized); shuffled, --calib-samples calibrate "
                       "and the next --verify-samples (at least 64) check; required for any other model")
    p.add_argument("--calib-samples", type=int, default=64, metavar="N", help="calibration images (default 64)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="calibration method (default minmax)")
    p.add_argument("--int8-min-top1", type=float, metavar="F", help="int8 check: least top-1 agreement with fp32 on "
                   "held-out images (default 0.95)")
    p.add_argument("--int8-min-cosine", type=float, metavar="F", help="int8 check: least mean logit cosine "
                   "(default 0.99)")
    p.add_argument("--int8-min-feature-cosine", type=float, metavar="F", help="int8 check with --features: least "
                   "mean cosine of every feature map (default 0.97)")
    p.add_argument("--int8-max-rel-error", type=float, metavar="F", help="int8 check: largest mean ||int8 - fp32|| "
                   "/ ||fp32|| of every output (default 0.3)")
    p.add_argument("--reduce-range", action="store_true", help="int8: 7-bit weights, for int8 CPU kernels that "
                   "saturate with full-range weights (x86 without VNNI); not needed for TensorRT")
    p.add_argument("--features", action="store_true", help="export the backbone's feature maps (outputs feat0..)")
    p.add_argument("--out-indices", type=int, nargs="+", metavar="I", help="feature levels with --features "
                   "(0 = stem .. 4 = last stage; default all)")
    p.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxslim/onnxsim")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the onnxruntime check")
    p.add_argument("--verify-samples", type=int, metavar="N", help="inputs to verify on (default 8; int8: 128 "
                   "held-out images)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT (and the --json file)")
    p.add_argument("--json", metavar="FILE", help="write a machine-readable report")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return p


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


def _print_int8(calib: dict, v: dict) -> None:
    """Every int8 figure: the enforced ones against their floors, then the reported ones."""
    f, m = v["floors"], v["metrics"]
    print(f"int8 check on {v['held_out_samples']} held-out {calib['source']} images (Q/DQ graph as written vs "
          "PyTorch fp32):")
    if calib["synthetic"]:
        print("  synthetic calibration: a smoke test; these figures say nothing about accuracy on real images")
    if not m.get("finite", False):
        print("  outputs contain NaN or Inf")
    elif m["classifier"]:
        print(f"  top-1 agreement {m['top1_agreement']:.2%} (floor {f['min_top1']:.2%}), logit cosine mean "
              f"{m['cosine_mean']:.5f} (floor {f['min_cosine']}), min {m['cosine_min']:.5f}, relative error "
              f"{m['rel_error']:.4f} (limit {f['max_rel_error']}), max rel err {m['max_rel']:.3e}")
    else:
        for i, (cos, low, rel) in enumerate(zip(m["feature_cosine"], m["feature_cosine_min"],
                                                m["feature_rel_error"], strict=True)):
            print(f"  output {i}: cosine mean {cos:.5f} (floor {f['min_feature_cosine']}), min {low:.5f}, relative "
                  f"error {rel:.4f} (limit {f['max_rel_error']})")
    k = v.get("onnxruntime_optimized") or {}
    if k.get("classifier") and k.get("finite"):
        print(f"  onnxruntime, all graph optimizations (reported, not enforced): top-1 agreement "
              f"{k['top1_agreement']:.2%}, logit cosine {k['cosine_mean']:.5f}")
    elif k.get("finite"):
        print("  onnxruntime, all graph optimizations (reported, not enforced): cosine "
              + ", ".join(f"{c:.5f}" for c in k["feature_cosine"]))
    if v.get("accuracy"):
        a = v["accuracy"]
        print(f"  held-out accuracy: PyTorch fp32 {a['fp32']:.2%}, int8 Q/DQ {a['int8']:.2%}, onnxruntime "
              f"optimized {a['onnxruntime_optimized']:.2%}")
    for problem in v["placement_problems"]:
        print(f"  Q/DQ placement: {problem}")
    print(f"  int8 check: {'ok' if v['passed'] else 'FAILED: ' + '; '.join(v['failures'])}")


def _print_report(report: dict) -> None:
    ops = ", ".join(f"{k} {v}" for k, v in report["ops"].items())
    print(f"model: {report['arch'] or 'custom'} -> {report['output']} ({report['precision']}, opset {report['opset']}, "
          f"input {report['in_chans']}x{report['input_size']}x{report['input_size']}, "
          f"{'dynamic' if report['dynamic_batch'] else 'fixed'} batch)")
    print(f"graph: {report['nodes']} nodes: {ops}")
    conv = report.get("conversion")
    if conv:
        print(f"conversion (deploy vs training form, float64): max rel err {conv['max_rel']:.3e} "
              f"(tolerance {conv['rtol']:.0e})")
    if "calibration" in report:
        c = report["calibration"]
        if c["method"] == "qat":
            print("scales: from quantization-aware training (no calibration)")
        else:
            print(f"calibration: {c['samples']} images from {c['source']} ({c['method']}"
                  f"{', 7-bit weights' if c['reduce_range'] else ''})")
    v = report.get("verification")
    if v is not None and report["precision"] == "int8":
        _print_int8(report["calibration"], v)
    elif v is not None:
        verdict = "ok" if v["passed"] else "FAILED"
        print(f"verification (onnxruntime vs PyTorch, {v['samples']} inputs): {v['summary']}: {verdict}")
    if report["written"]:
        size, total = report["file_bytes"] / 2**20, report["seconds"]["total"]
        print(f"wrote {report['output']} ({size:.2f} MiB) in {total:.1f} s")
    else:
        print(f"nothing written to {report['output']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``repvgg-export``; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), traceback=args.traceback)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    from ..conversion.api import VerificationError

    try:
        report, passed = export_checkpoint(args)
    except VerificationError as exc:
        error(f"the checkpoint's conversion failed verification ({exc}); nothing written")
        return EXIT_VERIFY
    if not args.quiet:
        _print_report(report)
    if not passed:
        error(f"verification failed ({report['verification']['summary']}); nothing written")
        return EXIT_VERIFY
    return 0


if __name__ == "__main__":
    sys.exit(main())
