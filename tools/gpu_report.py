#!/usr/bin/env python
"""GPU proof in one command: the RepVGG paper's speed table, deploy-vs-training equivalence and TensorRT engines on
this machine, within a time budget. Writes report.md, report.json and report.png to --out.

    PYTHONPATH=. python3 tools/gpu_report.py --out gpu_report                       # everything, 300 s budget
    python tools/gpu_report.py --device cpu --models repvgg_a0 resnet18 --size 32 --batch 2 --out /tmp/r   # smoke

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from repvgg_tools.bench import device_checks as checks  # noqa: E402
from repvgg_tools.bench.budget import Setup, Task, TimeBudget  # noqa: E402
from repvgg_tools.bench.device_report import FORMS, PAPER_IPS, PRECISIONS, failures, plot, ratios, render  # noqa: E402

TORCHVISION = checks.TORCHVISION_MODELS
DEFAULT_MODELS = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g4", "repvgg_b2",
                  "repvgg_b3", "vgg16", "resnet18", "resnet50"]
TRT_PRECISIONS = ("fp32", "fp16", "int8")
REPORT_RESERVE_S = 5.0  # kept free at the end of the budget for the plot and the report files
TRT_PRIOR_S = 30.0  # guess for the first engine (export + build + check + timing) before one was measured


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _optional(name: str):
    """``(module, None)`` or ``(None, reason)`` for an optional package."""
    try:
        return __import__(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"{name} is not importable ({_first_line(exc)})"


# ---------------------------------------------------------------------------------------------------- the run

def _prepared(name: str, device: torch.device, report: dict) -> dict:
    start = time.perf_counter()
    models = checks.prepare(name, device)
    report["models"][name].update(params=models["params"], build_seconds=time.perf_counter() - start)
    return models


def _execute(budget: TimeBudget, task: Task, put) -> None:
    """Run one task under the budget and store what came of it: its result, ``dropped`` or ``error``."""
    try:
        ran, value = budget.run(task)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        put({"error": "OOM"})
        return
    except Exception as exc:  # one failing row must not cost the others
        put({"error": _first_line(exc)})
        return
    put(value if ran else {"dropped": value})


def run(args, device: torch.device, budget: TimeBudget) -> dict:
    """Plan every row, run them cheap first within the budget, return the report's data."""
    report: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("force",)},
                    "environment": checks.environment(device), "paper": {"images_per_s": PAPER_IPS,
                                                                  "setting": "GTX 1080Ti, batch 128, 224x224, fp32"},
                    "models": {}, "unavailable": {}, "equivalence": {}, "throughput": {}, "onnx": {}, "tensorrt": {}}
    names = list(dict.fromkeys(args.models + args.trt_models))
    if any(n in TORCHVISION for n in names):
        _, reason = _optional("torchvision")
        if reason:
            for n in [n for n in names if n in TORCHVISION]:
                report["unavailable"][n] = reason
    costs = {}
    for name in [n for n in names if n not in report["unavailable"]]:
        try:
            costs[name] = checks.model_cost(name, args.size)
        except Exception as exc:  # a model that cannot even be built must not cost the others
            report["unavailable"][name] = f"could not build it to count its FLOPs ({_first_line(exc)})"
    names = [n for n in names if n not in report["unavailable"]]
    setups = {}
    for name in names:
        cost = costs[name]
        report["models"][name] = {"source": "torchvision" if name in TORCHVISION else "repvgg_tools",
                                  "gflops": {f: v / 1e9 for f, v in cost["flops"].items()}, "params": {}}
        setups[name] = Setup(f"build {name}", cost["params"], lambda name=name: _prepared(name, device, report))
    flops = {n: {f: report["models"][n]["gflops"][f] * 1e9 for f in FORMS} for n in names}
    timed = [n for n in args.models if n in names]

    tasks = []
    for name in sorted(timed, key=lambda n: flops[n]["training"]):
        tasks.append((Task(f"{name} equivalence", "equivalence", (flops[name]["training"] + flops[name]["deploy"])
                           * args.eq_batch, lambda m: checks.equivalence(m, device, args.eq_batch, args.size),
                           setups[name]), _putter(report["equivalence"], name)))
    rows = [(n, f, p) for n in timed for f in FORMS for p in PRECISIONS]
    rows.sort(key=lambda r: flops[r[0]][r[1]] * (0.5 if r[2] == "fp16" else 1.0))
    for name, form, prec in rows:
        tasks.append((Task(f"{name} {form} {prec}", f"throughput {prec} {form}",
                           flops[name][form] * args.batch * (args.iters + args.warmup),
                           lambda m, f=form, p=prec: checks.throughput(
                               m[f], p, device, args.batch, args.size, args.iters, args.warmup), setups[name]),
                      _putter(report["throughput"], name, form, prec)))
    first_export = len(tasks)
    tasks += _export_tasks(args, device, report, setups, flops)
    for i, (task, put) in enumerate(tasks):
        if i == first_export:  # free the GPU memory of the models the engines do not need
            budget.release(s.key for n, s in setups.items() if n not in args.trt_models)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[{budget.elapsed():6.1f} s] {task.key}", file=sys.stderr, flush=True)
        _execute(budget, task, put)
    budget.release(s.key for s in setups.values())
    report["ratios"] = ratios(report)
    report["budget"] = {"budget_s": budget.seconds, "elapsed_s": budget.elapsed(), "done": budget.done,
                        "dropped": budget.dropped, "setups": budget.setups}
    return report


def _export_tasks(args, device: torch.device, report: dict, setups: dict, flops: dict) -> list:
    """ONNX export rows and TensorRT engine rows (each needs its own optional packages)."""
    if not args.trt_models:
        report["onnx"] = report["tensorrt"] = {"skipped": "no --trt-models given"}
        return []
    missing = [r for r in (_optional("onnx")[1], _optional("onnxruntime")[1]) if r]
    if missing:
        report["onnx"] = {"skipped": "; ".join(missing)}
        report["tensorrt"] = {"skipped": "engines are built from ONNX: " + "; ".join(missing)}
        return []
    exported: dict = {}
    tasks = []
    trt_names = [n for n in args.trt_models if n in setups]  # not those listed as unavailable
    for name in trt_names:
        def check(models, name=name):
            exported[name], result = checks.onnx_check(models, args.size, min(args.eq_batch, 4))
            return result

        tasks.append((Task(f"{name} ONNX export + onnxruntime", "onnx", flops[name]["deploy"] * 4, check,
                           setups[name]), _putter(report["onnx"], name)))
    if device.type != "cuda":
        report["tensorrt"] = {"skipped": "no CUDA device: TensorRT engines run on CUDA only (no TensorRT runtime "
                                         "was created)"}
        return tasks
    from repvgg_tools.export import tensorrt as trt

    try:
        backend = trt.load_backend("auto")
    except trt.TensorRTError as exc:
        report["tensorrt"] = {"skipped": str(exc)}
        return tasks
    section = report["tensorrt"]
    section.update(backend=backend.name, version=backend.version, rows={})
    for name in trt_names:
        for prec in TRT_PRECISIONS:
            def engine(models, name=name, prec=prec):
                if "unsupported" in section:
                    return {"skipped": section["unsupported"]}
                if name not in exported:
                    return {"skipped": "the ONNX export of this model did not run"}
                try:
                    return checks.engine_check(
                        models, exported[name], prec, backend, size=args.size, batch=args.batch,
                        check_batch=min(args.eq_batch, args.batch), iters=args.iters, warmup=args.warmup,
                        calib_samples=args.calib_samples)
                except checks.EngineUnsupported as exc:
                    section["unsupported"] = str(exc)
                    return {"skipped": str(exc)}

            tasks.append((Task(f"{name} TensorRT {prec}", "tensorrt", flops[name]["deploy"], engine, setups[name],
                               prior_s=TRT_PRIOR_S), _putter(section["rows"], name, prec)))
    return tasks


def _putter(table: dict, *keys: str):
    """A function that stores a value at ``table[k0][k1]...``."""
    def put(value):
        node = table
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return put


# ---------------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from repvgg_tools.cli.common import Parser

    p = Parser(prog="gpu_report.py", description="The RepVGG paper's speed table, deploy-vs-training equivalence, "
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
    from repvgg_tools import list_models

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
    from repvgg_tools.cli.common import run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), traceback=args.traceback)


def _main(args: argparse.Namespace) -> int:
    try:
        device = _check(args)
        budget = TimeBudget(args.budget_s, start=_T0, reserve_s=min(REPORT_RESERVE_S, args.budget_s / 20))
    except UsageError as exc:
        from repvgg_tools.cli.common import EXIT_USAGE, error

        error(exc)
        return EXIT_USAGE
    from repvgg_tools.io.checkpoint import atomic_write

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
        report["plot"] = {"skipped": f"plotting failed ({_first_line(exc)})"}
    report["failures"] = failures(report)
    report["budget"]["elapsed_s"] = budget.elapsed()
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=str)),
                 force=True)  # first: whatever happens next, the figures are on disk
    try:
        text = render(report)
    except Exception as exc:
        text = f"# repvgg-tools GPU report\n\nRendering failed ({_first_line(exc)}); every figure is in report.json.\n"
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
