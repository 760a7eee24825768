"""Benchmark RepVGG/VGG forms on this machine: parameters, FLOPs, CPU latency and throughput of the training form,
the deploy form (NCHW and channels_last), timm's same model and onnxruntime, all in one run; optionally checkpoint
conversion (ours vs timm) and TensorRT on a GPU. Writes ``report.md``, ``report.json`` and ``report.png``.

Examples:
    repvgg-bench                                   # repvgg_a0 repvgg_b0 vgg16, batch 8, 224x224
    repvgg-bench --models repvgg_a0 --batch 1 --size 64 --iters 2 --out /tmp/bench
    repvgg-bench --models repvgg_b3 --conversion   # + conversion time and peak RAM vs timm
    repvgg-bench --trt                             # + TensorRT (needs CUDA and a TensorRT backend)
    repvgg-bench --fuser --threads 1               # graph fuser vs timm's reparameterize_model only
    repvgg-bench --fuser --fuser-models mobileone_s1 repvit_m1   # other timm families
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..bench.conversion import bench_conversion
from ..bench.cpu_report import plot_report, write_report
from ..bench.fuser import FUSER_MODELS, bench_fuser, fuser_markdown
from ..bench.latency import bench_model, bench_trt, machine_info, matmul_peak, summarize
from ..io.atomic import atomic_write
from .common import Parser, error, run_command


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="repvgg-bench", description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="default: repvgg_a0 repvgg_b0 vgg16 (none with --fuser alone)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=20, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch/onnxruntime threads (default: torch's)")
    p.add_argument("--out", default="bench_out", help="directory for report.md/json/png")
    p.add_argument("--force", action="store_true", help="overwrite the reports already in --out")
    p.add_argument("--no-timm", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--conversion", action="store_true", help="time repvgg_b3 checkpoint conversion, ours vs timm")
    p.add_argument("--conversion-arch", default="repvgg_b3")
    p.add_argument("--trt", action="store_true", help="TensorRT and PyTorch eager on the GPU (needs CUDA)")
    p.add_argument("--fuser", action="store_true", help="time our graph fuser vs timm's reparameterize_model on "
                   "the --fuser-models")
    p.add_argument("--fuser-models", nargs="+", default=list(FUSER_MODELS), metavar="NAME",
                   help="timm models for --fuser (default: %(default)s; e.g. add repghostnet_050 repvit_m1 "
                        "ghostnetv3_050 for every family)")
    args = p.parse_args(argv)
    return run_command(lambda: _main(args, p), traceback=args.traceback)


def _main(args: argparse.Namespace, p: Parser) -> int:
    if args.fuser:
        import timm

        unknown = [n for n in args.fuser_models if n not in timm.list_models()]
        if unknown:
            p.error(f"--fuser-models: timm {timm.__version__} has no {', '.join(unknown)}")
    if args.models is None:
        args.models = [] if args.fuser else ["repvgg_a0", "repvgg_b0", "vgg16"]

    from .. import list_models

    unknown = [n for n in args.models if n not in list_models()]
    if unknown or args.batch < 1 or args.size < 32 or args.iters < 1 or args.warmup < 0:
        msg = f"unknown model(s) {', '.join(unknown)}" if unknown else "--batch, --iters >= 1, --size >= 32"
        error(msg)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        error(f"{out} exists and is not a directory")
        return 2
    existing = [out / f"report.{ext}" for ext in ("md", "json", "png") if (out / f"report.{ext}").exists()]
    if existing and not args.force:
        error(f"{existing[0]}: already exists (use --force to overwrite)")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"machine": machine_info(), "batch": args.batch, "size": args.size, "iters": args.iters,
              "warmup": args.warmup, "models": {}}
    report["machine"]["peak_gflops"] = matmul_peak()
    for name in args.models:
        print(f"benchmarking {name} ...", file=sys.stderr)
        res = bench_model(name, args)
        res["summary"] = summarize(name, res)
        report["models"][name] = res
    if args.conversion:
        print(f"converting {args.conversion_arch} (ours vs timm) ...", file=sys.stderr)
        report["conversion"] = bench_conversion(args.conversion_arch)
    if args.trt:
        report["trt"] = bench_trt(args.models, args)
    if args.fuser:
        print("graph fuser vs timm reparameterize_model ...", file=sys.stderr)
        report["fuser"] = bench_fuser(args.fuser_models)
    report["machine"]["loadavg_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    write_report(report, out)
    if report["models"]:
        plot_report(report, out)
    if args.fuser:  # the fuser's table joins the report, still written in one atomic step
        text = (out / "report.md").read_text() + "\n" + fuser_markdown(report["fuser"])
        atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text), force=True)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
