"""GPU proof in one command: the RepVGG paper's speed table, deploy-vs-training equivalence and TensorRT engines on
this machine, within a time budget. Writes report.md, report.json and report.png to --out.

    PYTHONPATH=. python3 tools/gpu_report.py --out gpu_report                       # everything, 300 s budget
    repvgg-gpu-report --device cpu --models repvgg_a0 resnet18 --size 32 --batch 2 --out /tmp/r   # smoke

Throughput: batch 128, 224x224 (the paper's setting), training and deploy form of each model, fp32 with TF32 off (the
paper's condition) and fp16 autocast, channels_last, cudnn.benchmark on, CUDA-event medians after a warm-up.
Equivalence: deploy vs training with randomized BatchNorm statistics, fp32 (max|a-b|/max|b| <= 1e-5), float64
(<= 1e-12) and fp16 autocast (cosine >= 0.9999, same top-1 on >= 99%). Rows run cheap first; once --budget-s would be
overrun by a row's estimate (from the measured seconds per FLOP), the row is dropped and listed in the report.

Needs only torch (>= 2.4). torchvision (the ResNet baselines), onnx + onnxruntime (ONNX and TensorRT rows), tensorrt
or tensorrt_rtx (engines, CUDA only) and matplotlib (the PNG) each enable only their own rows. Exit status: 0 all
checks passed, 1 a check failed (the report is still written), 2 bad arguments.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from here, imports included

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from ..bench.budget import TimeBudget  # noqa: E402
from ..bench.device_report import failures, plot, render  # noqa: E402
from ..bench.device_run import TORCHVISION, run  # noqa: E402
from ..io.errors import one_line  # noqa: E402

DEFAULT_MODELS = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g4", "repvgg_b2",
                  "repvgg_b3", "vgg16", "resnet18", "resnet50"]
REPORT_RESERVE_S = 5.0  # kept free at the end of the budget for the plot and the report files


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    from .common import Parser

    p = Parser(prog="repvgg-gpu-report", description="The RepVGG paper's speed table, deploy-vs-training equivalence, "
                "ONNX and TensorRT checks on this machine's GPU, within a time budget.", epilog=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for report.md, report.json, report.png")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the whole run (default 300)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="models of the speed table")
    p.add_argument("--trt-models", nargs="*", default=["repvgg_a0", "repvgg_b0"],
                   help="models exported to ONNX and built as TensorRT engines (none: skip)")
    p.add_argument("--batch", type=int, default=128, help="throughput batch (default 128, the paper's)")
    p.add_argument("--size", type=int, default=224, help="input side (default 224)")
    p.add_argument("--iters", type=int, default=20, help="timed runs per row (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (cuDNN autotuning)")
    p.add_argument("--eq-batch", type=int, default=16, help="inputs of the equivalence checks")
    p.add_argument("--calib-samples", type=int, default=32, help="int8 calibration images (random, like the weights)")
    p.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    return p


def _check(args) -> torch.device:
    from .. import list_models

    known = set(list_models()) | set(TORCHVISION)
    unknown = [n for n in args.models + args.trt_models if n not in known]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}")
    bad_trt = [n for n in args.trt_models if n in TORCHVISION]
    if bad_trt:
        raise UsageError(f"--trt-models takes our models, not {', '.join(bad_trt)}")
    for flag, value, low in (("--batch", args.batch, 1), ("--size", args.size, 32), ("--iters", args.iters, 1),
                             ("--warmup", args.warmup, 0), ("--eq-batch", args.eq_batch, 1),
                             ("--calib-samples", args.calib_samples, 1)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, not {value}")
    if not args.budget_s > 0:
        raise UsageError(f"--budget-s must be positive, not {args.budget_s:g}")
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device") from None
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device must be cpu or cuda, not {args.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    existing = [out / n for n in ("report.md", "report.json", "report.png") if (out / n).exists()]
    if existing and not args.force:
        raise UsageError(f"{existing[0]}: already exists (use --force to overwrite)")
    return device


def main(argv: list[str] | None = None) -> int:
    from .common import run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), traceback=args.traceback)


def _main(args: argparse.Namespace) -> int:
    try:
        device = _check(args)
        budget = TimeBudget(args.budget_s, start=_T0, reserve_s=min(REPORT_RESERVE_S, args.budget_s / 20))
    except UsageError as exc:
        from .common import EXIT_USAGE, error

        error(exc)
        return EXIT_USAGE
    from ..io.checkpoint import atomic_write

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows: the paper's fp32; fp16 autocast is unaffected
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    report = run(args, device, budget)
    try:
        report["plot"] = plot(report, out / "report.png")
    except Exception as exc:  # a plotting problem must not cost the report
        report["plot"] = {"skipped": f"plotting failed ({one_line(exc)})"}
    report["failures"] = failures(report)
    report["budget"]["elapsed_s"] = budget.elapsed()
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=str)),
                 force=True)  # first: whatever happens next, the figures are on disk
    try:
        text = render(report)
    except Exception as exc:
        text = f"# repvgg-tools GPU report\n\nRendering failed ({one_line(exc)}); every figure is in report.json.\n"
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text), force=True)
    print(text)
    print(f"wrote {out / 'report.md'}, report.json" + (", report.png" if "file" in report["plot"] else "")
          + f" in {budget.elapsed():.1f} s", file=sys.stderr)
    if report["failures"]:
        print("error: checks failed: " + ", ".join(report["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
