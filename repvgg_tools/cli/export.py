"""``repvgg-export CHECKPOINT OUT.onnx``: a training or deploy checkpoint to a verified fp32/fp16/int8 ONNX model.

Exit codes: 0 success, 1 failed verification (nothing written), 2 usage or input error. Errors are one line.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main", "build_parser"]

from ..export.pipeline import export_checkpoint
from .common import EXIT_VERIFY, Parser, error, run_command

log = logging.getLogger("repvgg_tools.cli.export")


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
