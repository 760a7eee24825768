"""The int8 study: RepVGG vs QARepVGG of the same size, same recipe, under PTQ (each calibration method) and QAT.

For each dataset (the bundled digits; a deterministic shapes-and-textures set, repvgg_tools.bench.quant_study) both
families are trained with one recipe and seed, fused, exported to ONNX and quantized to TensorRT-style int8 Q/DQ
with each calibration method (calibration images never overlap the held-out images) and by quantization-aware
fine-tuning. Reported: held-out top-1 of fp32, every PTQ method and QAT (the Q/DQ ONNX run as written on
onnxruntime), and per fused layer the weight SQNR (per channel, as exported, and per tensor), the spread of the
per-channel weight ranges, the activation outlier ratio max/p99.9 and the activation SQNR at each method's
threshold. Writes OUT/report.md, OUT/report.json and OUT/report.png (matplotlib); never overwrites without --force.

Examples:
    repvgg-int8-study --out runs/int8_study
    repvgg-int8-study --out /tmp/s --smoke
    repvgg-int8-study --out runs/s2 --datasets shapes --epochs 12 --width 24 --force
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ..bench.int8_report import _finite, check_outputs, markdown, plot, summary
from ..bench.int8_study import DATASETS, FAMILIES, METHODS, SMOKE, load_data, study_family
from .common import EXIT_USAGE, Parser, error, run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="repvgg-int8-study", description=__doc__.split("\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", required=True, help="output directory (created; report.* never overwritten without "
                                                 "--force)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="PTQ calibration methods")
    p.add_argument("--epochs", type=int, default=10, help="fp32 training epochs (both families)")
    p.add_argument("--qat-epochs", type=int, default=2, help="quantization-aware fine-tuning epochs (0: no QAT)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=16, help="stage widths W, W, 2W, 4W, 8W")
    p.add_argument("--depths", type=int, nargs=5, default=[1, 2, 2, 2, 1], metavar="D",
                   help="blocks per stage (stage 0 must be 1)")
    p.add_argument("--train-samples", type=int, default=8000, help="shapes: training images")
    p.add_argument("--calib-samples", type=int, default=256, help="calibration images (from the training split)")
    p.add_argument("--test-samples", type=int, default=1000, help="shapes: held-out images (digits: its val split)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="SGD momentum learning rate")
    p.add_argument("--qat-lr", type=float, default=0.001, help="QAT learning rate (the fused model has no BatchNorm: "
                   "recipes/digits_qat.yaml's 0.001)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny configuration for tests (seconds): "
                   + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    positive = {"--epochs": args.epochs, "--image-size": args.image_size, "--width": args.width,
                "--train-samples": args.train_samples, "--calib-samples": args.calib_samples,
                "--test-samples": args.test_samples, "--batch-size": args.batch_size}
    for name, value in positive.items():
        if value < 1:
            p.error(f"{name} must be >= 1, not {value}")
    if args.qat_epochs < 0 or not args.lr > 0 or not args.qat_lr > 0:
        p.error("--qat-epochs must be >= 0, --lr and --qat-lr > 0")
    if args.depths[0] != 1 or min(args.depths) < 1:
        p.error(f"--depths must be 5 numbers >= 1 with 1 first, not {args.depths}")
    if args.image_size < 8:
        p.error(f"--image-size must be >= 8, not {args.image_size}")
    args.methods = list(dict.fromkeys(args.methods))
    args.datasets = list(dict.fromkeys(args.datasets))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: _main(args, argv), traceback=args.traceback)


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    out = Path(args.out)
    try:
        check_outputs(out, args.force)
    except ValueError as exc:  # CheckpointError is a ValueError
        error(exc)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import torch

    from repvgg_tools.bench.quant_study import SHAPES, TEXTURES
    from repvgg_tools.io.checkpoint import atomic_write

    torch.set_num_threads(1 if args.smoke else max(1, min(torch.get_num_threads(), 2)))  # smoke: tiny ops

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, flush=True)

    start = time.perf_counter()
    w = args.width
    report: dict = {"config": {
        "command": " ".join(["python", "tools/int8_study.py", *(sys.argv[1:] if argv is None else argv)]),
        "widths": [w, w, 2 * w, 4 * w, 8 * w], "depths": args.depths, "image_size": args.image_size,
        "epochs": args.epochs, "qat_epochs": args.qat_epochs, "lr": args.lr, "qat_lr": args.qat_lr,
        "batch_size": args.batch_size,
        "seed": args.seed, "methods": args.methods, "datasets": args.datasets, "smoke": args.smoke,
        "shapes_classes": [f"{s}/{t}" for s in SHAPES for t in TEXTURES]}, "datasets": {}}
    for ds in args.datasets:
        data = load_data(ds, args)
        data["name"] = ds
        log(f"{ds}: {len(data['train'][0])} train, {len(data['calib'][0])} calibration, "
            f"{len(data['test'][0])} held-out images, {data['classes']} classes")
        section = {"classes": data["classes"], "families": {},
                   "samples": {k: len(data[k][0]) for k in ("train", "calib", "test")}}
        for fam in FAMILIES:
            section["families"][fam] = study_family(fam, data, args, log)
            section["families"][fam]["summary"] = summary(section["families"][fam])
        report["datasets"][ds] = section
    report["wall_seconds"] = time.perf_counter() - start
    note = plot(report, out / "report.png", args.force)
    if note:
        report["notes"] = [note]
    text = markdown(report) + (f"\nNote: {note}\n" if note else "")
    body = json.dumps(_finite(report), indent=1, allow_nan=False)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(body), force=args.force)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text), force=args.force)
    log(text)
    log(f"wrote {out}/report.md, report.json{'' if note else ', report.png'} in {report['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
