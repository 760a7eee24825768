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

from .common import EXIT_USAGE, EXIT_VERIFY, Parser, error

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
    calib.add_argument("--calib", choices=("digits",), default="digits",
                       help="int8 calibration set: the built-in digits set (default)")
    calib.add_argument("--calib-dir", metavar="DIR", help="int8 calibration images (an ImageFolder-style directory; "
                       "resized, centre-cropped, ImageNet-normalized)")
    p.add_argument("--calib-samples", type=int, default=64, metavar="N", help="calibration images (default 64)")
    p.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="calibration method (default minmax)")
    p.add_argument("--reduce-range", action="store_true", help="int8: 7-bit weights, for onnxruntime's CPU kernels on "
                   "x86 without VNNI (they saturate with full-range weights); not needed for TensorRT")
    p.add_argument("--features", action="store_true", help="export the backbone's feature maps (outputs feat0..)")
    p.add_argument("--out-indices", type=int, nargs="+", metavar="I", help="feature levels with --features "
                   "(0 = stem .. 4 = last stage; default all)")
    p.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxslim/onnxsim")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the onnxruntime check")
    p.add_argument("--verify-samples", type=int, metavar="N", help="inputs to verify on (default 8; int8: 32)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT (and the --json file)")
    p.add_argument("--json", metavar="FILE", help="write a machine-readable report")
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return p


def load_deploy_model(path: str, arch: str | None = None, layout: str | None = None, ema: bool = False, *,
                      model_kwargs: dict | None = None, bn_eps: float | None = None) -> tuple[nn.Module, dict]:
    """``(deploy-form model in eval mode, info)`` from a checkpoint of any layout (:func:`repvgg_tools.convert.
    load_model`: ours, official RepVGG, timm, MMPretrain, torchvision VGG; training or deploy form).

    A training checkpoint is converted with verification: the deploy weights are checked in float64 against the
    training form built from the checkpoint's own tensors (``info["conversion"]`` has the figures), so the ONNX
    model, checked against this deploy model, is checked against the input checkpoint.

    Raises:
        VerificationError: the fused weights do not reproduce the training form.
    """
    from ..convert import load_model

    model, info = load_model(path, arch=arch, layout=layout, ema=ema, model_kwargs=model_kwargs, bn_eps=bn_eps,
                             verify=True)
    return model.eval(), dict(info)


def features_model(model, arch: str | None, out_indices):
    """A multi-output backbone over ``model``'s weights: ``create_model(arch, features_only=True)`` when ``arch``
    is registered, else ``model`` cut at its ``feature_info`` levels (torchvision's feature extractor).

    Raises:
        UsageError: the model has no feature levels, or bad ``out_indices``.
    """
    from ..features import load_backbone_weights, normalize_out_indices
    from ..models import create_model, is_model

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


def _batches(images, batch: int | None, dynamic: bool) -> list:
    images = torch.as_tensor(images)
    if not dynamic:
        n = len(images) - len(images) % batch
        if n == 0:
            raise UsageError(f"fewer verification images ({len(images)}) than the fixed batch {batch}")
        images = images[:n]
        return list(images.split(batch))
    return list(images.split(16))


def export_checkpoint(args: argparse.Namespace) -> tuple[dict, bool]:
    """Run the export described by parsed arguments; returns ``(report, verification passed)``.

    Raises:
        UsageError, CheckpointError, ExportError, PrecisionError: input or usage problems (exit 2).
    """
    from ..checkpoint import CheckpointError, atomic_write, check_output_path
    from ..export.onnx import export_onnx, model_io, onnx_session, op_counts, save_onnx, torch_outputs, verify_onnx
    from ..export.precision import calibration_images, digits_images, quantize_int8, to_fp16

    out = Path(args.output)
    if not Path(args.checkpoint).exists():
        raise CheckpointError(f"{args.checkpoint}: no such file")
    check_output_path(out, args.force, (args.checkpoint,))
    if args.json:
        check_output_path(args.json, args.force, (args.checkpoint, args.output))
    if args.input_size < 8 or args.batch < 1 or args.calib_samples < 1:
        raise UsageError("--input-size must be >= 8, --batch and --calib-samples >= 1")
    if args.out_indices and not args.features:
        raise UsageError("--out-indices needs --features")
    if args.fp16_io and args.precision != "fp16":
        raise UsageError("--fp16-io needs --precision fp16")
    if args.precision != "int8" and (args.calib_dir or args.calib_samples != 64 or args.calib_method != "minmax"
                                     or args.reduce_range):
        raise UsageError("calibration options need --precision int8")
    samples = args.verify_samples or (32 if args.precision == "int8" else 8)
    if samples < 1:
        raise UsageError("--verify-samples must be at least 1")
    torch.manual_seed(0)
    timings = {}
    start = time.perf_counter()
    kwargs = {"output_stride": args.output_stride} if args.output_stride else None
    model, info = load_deploy_model(args.checkpoint, args.arch, args.layout, args.ema, model_kwargs=kwargs,
                                    bn_eps=args.bn_eps)
    arch = args.arch or info.get("arch")
    if args.features:
        model = features_model(model, arch, args.out_indices)
    in_chans = _in_chans(model)
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
    calib_source = args.calib_dir or args.calib
    if args.precision == "fp16":
        proto = to_fp16(proto, keep_io_types=not args.fp16_io)
    elif args.precision == "int8":
        images = calibration_images(calib_source, args.input_size, args.calib_samples, in_chans)
        proto = quantize_int8(proto, images, method=args.calib_method, reduce_range=args.reduce_range)
        used = len(images) if args.dynamic_batch else len(images) - len(images) % args.batch
        report["calibration"] = {"source": calib_source, "samples": used, "method": args.calib_method,
                                 "reduce_range": args.reduce_range}
    timings["precision"] = time.perf_counter() - t
    report.update(ops=dict(sorted(op_counts(proto).items())), nodes=len(proto.graph.node), io=model_io(proto))
    passed = True
    if args.verify:
        t = time.perf_counter()
        if args.precision == "int8":
            inputs, note = _int8_verify_inputs(args, calib_source, in_chans, samples)
        else:
            inputs, note = _verify_inputs(args, in_chans, samples), "random standard-normal inputs"
        ref = torch_outputs(model, inputs)
        # int8: the contract is checked on the Q/DQ graph as written (what TensorRT builds from); onnxruntime's fused
        # int8 CPU kernels are measured too, since they can saturate on CPUs without VNNI
        exact = args.precision == "int8"
        result = verify_onnx(onnx_session(proto, exact_qdq=exact), model, args.precision, inputs, ref)
        result["inputs"] = note
        if args.precision == "int8":
            kernels = verify_onnx(onnx_session(proto), model, "int8", inputs, ref)
            result["onnxruntime_int8_kernels"] = {k: kernels[k] for k in ("cosine", "top1_agreement", "max_rel")}
            if calib_source == "digits" and _is_digits_classifier(model, args, in_chans):
                result["digits_val_accuracy"] = _digits_accuracy(proto, model, args, in_chans, digits_images)
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


def _int8_verify_inputs(args, source: str, in_chans: int, samples: int) -> tuple[list, str]:
    from ..export.precision import digits_images, folder_images

    if not args.dynamic_batch:
        samples = max(samples, args.batch)
    if source == "digits":
        images = digits_images("val", args.input_size, in_chans, samples)[0]
        note = f"{len(images)} digits validation images (held out from calibration)"
    else:
        images = folder_images(source, args.input_size, None, in_chans)
        held_out = images[args.calib_samples:]
        if len(held_out):
            images, note = held_out[:samples], "images of --calib-dir not used for calibration"
        else:
            images, note = images[:samples], "the calibration images (no other images in --calib-dir)"
        note = f"{len(images)} {note}"
    return _batches(images, args.batch, args.dynamic_batch), note


def _is_digits_classifier(model, args, in_chans: int) -> bool:
    with torch.no_grad():
        out = model(torch.zeros(1, in_chans, args.input_size, args.input_size))
    return isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] == 10


def _digits_accuracy(proto, model, args, in_chans: int, digits_images) -> dict:
    """Top-1 accuracy on the whole digits validation split: PyTorch (fp32), the ONNX model's Q/DQ graph as written,
    and onnxruntime's fused int8 CPU kernels."""
    import numpy as np

    from ..export.onnx import onnx_session, run_onnx

    images, labels = digits_images("val", args.input_size, in_chans)
    step = 16 if args.dynamic_batch else args.batch
    batches = list(zip(_batches(images, args.batch, args.dynamic_batch), torch.as_tensor(labels).split(step),
                       strict=False))
    n = sum(len(y) for _, y in batches)
    hits = {"pytorch_fp32": 0, "onnx": 0, "onnxruntime_int8_kernels": 0}
    sessions = {"onnx": onnx_session(proto, exact_qdq=True), "onnxruntime_int8_kernels": onnx_session(proto)}
    for x, y in batches:
        with torch.no_grad():
            hits["pytorch_fp32"] += int((model(x).argmax(1) == y).sum())
        for name, session in sessions.items():
            hits[name] += int((np.argmax(run_onnx(session, x)[0], 1) == y.numpy()).sum())
    return {"samples": n, **{k: v / n for k, v in hits.items()}}


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
        print(f"calibration: {c['samples']} images from {c['source']} ({c['method']})")
    v = report.get("verification")
    if v is not None:
        verdict = "ok" if v["passed"] else "FAILED"
        print(f"verification (onnxruntime vs PyTorch, {v['samples']} inputs): {v['summary']}: {verdict}")
        kernels = v.get("onnxruntime_int8_kernels")
        if kernels is not None:
            print(f"onnxruntime int8 CPU kernels: cosine {kernels['cosine']:.4f}"
                  + ("" if kernels["top1_agreement"] is None else f", top-1 agreement {kernels['top1_agreement']:.1%}"))
        if "digits_val_accuracy" in v:
            a = v["digits_val_accuracy"]
            print(f"digits val accuracy ({a['samples']} images): PyTorch fp32 {a['pytorch_fp32']:.2%}, "
                  f"ONNX int8 {a['onnx']:.2%}, onnxruntime int8 CPU kernels {a['onnxruntime_int8_kernels']:.2%}")
    if report["written"]:
        size, total = report["file_bytes"] / 2**20, report["seconds"]["total"]
        print(f"wrote {report['output']} ({size:.2f} MiB) in {total:.1f} s")
    else:
        print(f"nothing written to {report['output']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``repvgg-export``; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    from ..checkpoint import CheckpointError
    from ..convert import VerificationError
    from ..export.onnx import ExportError
    from ..export.precision import PrecisionError

    try:
        report, passed = export_checkpoint(args)
    except VerificationError as exc:
        error(f"the checkpoint's conversion failed verification ({exc}); nothing written")
        return EXIT_VERIFY
    except (UsageError, CheckpointError, ExportError, PrecisionError, ValueError, OSError) as exc:
        error(exc)
        return EXIT_USAGE
    if not args.quiet:
        _print_report(report)
    if not passed:
        error(f"verification failed ({report['verification']['summary']}); nothing written")
        return EXIT_VERIFY
    return 0


if __name__ == "__main__":
    sys.exit(main())
