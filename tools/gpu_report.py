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

from repvgg_tools import device_checks as checks  # noqa: E402
from repvgg_tools.budget import Setup, Task, TimeBudget  # noqa: E402

# images/s at batch 128, 224x224, fp32 on a GTX 1080Ti (RepVGG paper, Ding et al. 2021, Tables 3 and 4)
PAPER_IPS = {"repvgg_a0": 3256, "repvgg_a1": 2339, "repvgg_a2": 1322, "repvgg_b0": 1817, "repvgg_b1": 685,
             "repvgg_b1g4": 868, "repvgg_b2": 460, "resnet18": 2442, "resnet50": 719, "vgg16": 415}
TORCHVISION = checks.TORCHVISION_MODELS
BASELINES = ("resnet18", "resnet50")
DEFAULT_MODELS = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g4", "repvgg_b2",
                  "repvgg_b3", "vgg16", "resnet18", "resnet50"]
FORMS = ("training", "deploy")
PRECISIONS = ("fp32", "fp16")
TRT_PRECISIONS = ("fp32", "fp16", "int8")
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
    names = [n for n in names if n not in report["unavailable"]]
    setups = {}
    for name in names:
        cost = checks.model_cost(name, args.size)
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
    tasks += _export_tasks(args, device, report, setups, flops)
    for task, put in tasks:
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
    for name in args.trt_models:
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
    for name in args.trt_models:
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


def _ips(report: dict, name: str, form: str, prec: str) -> float | None:
    return report["throughput"].get(name, {}).get(form, {}).get(prec, {}).get("images_per_s")


def ratios(report: dict) -> dict:
    """Speedups: deploy vs training per precision; each model's deploy form vs the ResNets as torchvision ships
    them (training form, eval mode: what the paper timed); the paper's ratios from its 1080Ti figures."""
    out = {}
    for name in report["throughput"]:
        r = {}
        for prec in PRECISIONS:
            t, d = _ips(report, name, "training", prec), _ips(report, name, "deploy", prec)
            r[f"deploy_vs_training_{prec}"] = d / t if t and d else None
            for base in BASELINES:
                b = _ips(report, base, "training", prec)
                r[f"vs_{base}_{prec}"] = d / b if d and b else None
        for base in BASELINES:
            r[f"paper_vs_{base}"] = PAPER_IPS[name] / PAPER_IPS[base] if name in PAPER_IPS else None
        out[name] = r
    return out


# ---------------------------------------------------------------------------------------------------- the report

def _f(value, spec: str = ".0f", none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _cell(row: dict | None, key: str = "images_per_s", spec: str = ".0f") -> str:
    """A table cell: the figure, or why there is none."""
    if not row:
        return "—"
    if "dropped" in row:
        return "dropped (budget)"
    if "error" in row:
        return "OOM" if row["error"] == "OOM" else "error"
    if "skipped" in row:
        return "skipped"
    return _f(row.get(key), spec)


def _verdict(ok) -> str:
    return "—" if ok is None else ("**ok**" if ok else "**FAILED**")


def render(report: dict) -> str:
    """report.md."""
    env, cfg, budget = report["environment"], report["config"], report["budget"]
    device = (f"{env['gpu']} (compute capability {env['capability']}, {env['gpu_memory_gib']} GiB), driver "
              f"{env['driver']}" if "gpu" in env else f"CPU only ({env['cpu']}, {env['torch_threads']} threads)")
    lines = ["# repvgg-tools GPU report", "",
             f"- Device: {device}", f"- torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, Python "
             f"{env['python']}; installed: " + ", ".join(f"{k} {v}" for k, v in env["installed"].items() if v),
             f"- Setting: batch {cfg['batch']}, {cfg['size']}x{cfg['size']}, channels_last, "
             f"cudnn.benchmark={env['cudnn_benchmark']}, TF32 matmul={env['tf32_matmul']} / cuDNN={env['tf32_cudnn']}"
             f"; fp16 = torch.autocast(float16); medians of {cfg['iters']} timed runs after {cfg['warmup']} warm-up "
             f"runs ({'CUDA events' if 'gpu' in env else 'wall clock'}).",
             "- Models have random weights and randomized BatchNorm statistics (speed and equivalence do not depend "
             "on trained weights).",
             f"- Budget: {budget['budget_s']:g} s; used {budget['elapsed_s']:.1f} s; {len(budget['done'])} rows "
             f"measured, {len(budget['dropped'])} dropped.", ""]
    if "gpu" not in env:
        lines += ["CPU run: the timings only prove the tool works; they say nothing about GPU speed.", ""]
    lines += _throughput_md(report) + _equivalence_md(report) + _export_md(report)
    if budget["dropped"]:
        lines += ["## Dropped to fit the budget", "",
                  "Rows run cheap first; each is estimated from the seconds per FLOP last measured for its kind of row "
                  "and dropped when the estimate exceeds the time left.", "",
                  "| row | estimate (s) | time left (s) | reason |", "|---|---:|---:|---|"]
        lines += [f"| {d['key']} | {_f(d['estimate_s'], '.1f')} | {d['left_s']:.1f} | {d['reason']} |"
                  for d in budget["dropped"]]
        lines.append("")
    if report["unavailable"]:
        lines += ["## Not run: optional package missing", ""]
        lines += [f"- {name}: {reason}" for name, reason in report["unavailable"].items()]
        lines.append("")
    plot = report.get("plot", {})
    lines += ["## Plot", "", "![images/s](report.png)" if plot.get("file") else f"PNG skipped: {plot.get('skipped')}",
              ""]
    return "\n".join(lines)


def _throughput_md(report: dict) -> list[str]:
    lines = ["## Throughput (images/s), the paper's table", "",
             "Paper: RepVGG (Ding et al., 2021), GTX 1080Ti, batch 128, 224x224, fp32. Deploy vs training is the "
             "speedup of re-parameterization.", "",
             "| model | paper | training fp32 | deploy fp32 | deploy/training fp32 | training fp16 | deploy fp16 | "
             "deploy/training fp16 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rat = report["ratios"]
    for name, forms in report["throughput"].items():
        r = rat.get(name, {})
        lines.append(f"| {name} | {_f(PAPER_IPS.get(name))} | {_cell(forms.get('training', {}).get('fp32'))} | "
                     f"{_cell(forms.get('deploy', {}).get('fp32'))} | {_f(r.get('deploy_vs_training_fp32'), '.2f')}x"
                     f" | {_cell(forms.get('training', {}).get('fp16'))} | {_cell(forms.get('deploy', {}).get('fp16'))}"
                     f" | {_f(r.get('deploy_vs_training_fp16'), '.2f')}x |")
    lines += ["", "Each model's deploy form vs the ResNets as torchvision ships them (eval mode, BatchNorm not folded: "
              "what the paper timed), next to the paper's ratio:", "",
              "| model | vs ResNet-18 fp32 | paper | vs ResNet-50 fp32 | paper | vs ResNet-18 fp16 | "
              "vs ResNet-50 fp16 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rat.items():
        cells = [_f(r.get(k), ".2f") for k in ("vs_resnet18_fp32", "paper_vs_resnet18", "vs_resnet50_fp32",
                                               "paper_vs_resnet50", "vs_resnet18_fp16", "vs_resnet50_fp16")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    errors = [(n, f, p, row["error"]) for n, forms in report["throughput"].items() for f, precs in forms.items()
              for p, row in precs.items() if "error" in row]
    if errors:
        lines += ["", "Rows that failed: " + "; ".join(f"{n} {f} {p}: {e}" for n, f, p, e in errors) + "."]
    return lines + [""]


def _equivalence_md(report: dict) -> list[str]:
    lines = ["## Equivalence on the device: deploy vs training", "",
             "Contract (design.md section 5): fp32 max|a-b|/max|b| <= 1e-5; float64 <= 1e-12; fp16 autocast deploy vs "
             "fp32 training: cosine >= 0.9999 and the same top-1 on >= 99% of inputs. The fp32 noise column is the "
             "training form's own fp32 error against float64 (what the kernels contribute).", "",
             "| model | inputs | fp32 rel err | float64 rel err | fp32 noise | fp16 cosine | fp16 top-1 | fp16 rel err "
             "| verdict |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in report["equivalence"].items():
        if "samples" not in e:
            lines.append(f"| {name} | {_cell(e)} | " + " | ".join([""] * 6) + f" | {e.get('error', '')} |")
            continue
        top1 = e["fp16_top1_agreement"]
        lines.append(f"| {name} | {e['samples']} | {e['fp32_max_rel']:.2e} | {e['fp64_max_rel']:.2e} | "
                     f"{e['fp32_noise_training_vs_fp64']:.2e} | {e['fp16_cosine']:.6f} | "
                     f"{'—' if top1 is None else f'{top1:.0%}'} | {e['fp16_max_rel']:.2e} | {_verdict(e['passed'])} |")
    return lines + [""]


def _export_md(report: dict) -> list[str]:
    lines = ["## ONNX export (deploy form, fp32, checked on onnxruntime CPU)", ""]
    onnx = report["onnx"]
    if "skipped" in onnx:
        lines.append(f"Skipped: {onnx['skipped']}.")
    else:
        lines += ["| model | check | verdict |", "|---|---|---|"]
        lines += [f"| {n} | {r.get('summary', _cell(r) + ' ' + r.get('error', ''))} | {_verdict(r.get('passed'))} |"
                  for n, r in onnx.items()]
    lines += ["", "## TensorRT", ""]
    trt = report["tensorrt"]
    if "skipped" in trt:
        return lines + [f"Skipped: {trt['skipped']}.", ""]
    lines += [f"Backend: {trt['backend']} {trt['version']}" + (f"; {trt['unsupported']}" if "unsupported" in trt
                                                                else ""), "",
              "| model | engine | build (s) | vs PyTorch | verdict | images/s | vs PyTorch deploy |",
              "|---|---|---:|---|---|---:|---:|"]
    for name, precs in trt["rows"].items():
        for prec, r in precs.items():
            torch_prec = "fp32" if prec == "fp32" else "fp16"
            base = _ips(report, name, "deploy", torch_prec)
            speed = (f"{r['images_per_s'] / base:.2f}x ({torch_prec})" if base and r.get("images_per_s") else "—")
            lines.append(f"| {name} | {prec} | {_f(r.get('build_seconds'), '.1f')} | "
                         f"{r.get('summary', r.get('skipped', r.get('error', _cell(r))))} | "
                         f"{_verdict(r.get('passed'))} | {_cell(r)} | {speed} |")
    return lines + [""]


def plot(report: dict, path: Path) -> dict:
    """report.png: images/s of every model, form and precision, with the paper's figure; needs matplotlib."""
    mpl, reason = _optional("matplotlib")
    if reason:
        return {"skipped": reason}
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from repvgg_tools.checkpoint import atomic_write

    names = list(report["throughput"])
    series = [(f"{form} {prec}", form, prec) for prec in PRECISIONS for form in FORMS]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 3), 4.5))
    width = 0.8 / (len(series) + 1)
    for i, (label, form, prec) in enumerate(series):
        vals = [_ips(report, n, form, prec) or 0 for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=label)
    ax.bar([j + len(series) * width for j in range(len(names))], [PAPER_IPS.get(n, 0) for n in names], width,
           label="paper (1080Ti fp32 deploy)", color="grey")
    ax.set_xticks([j + width * len(series) / 2 for j in range(len(names))], names, rotation=30, ha="right")
    env = report["environment"]
    ax.set_ylabel("images/s")
    ax.set_title(f"{env.get('gpu', 'CPU')}, batch {report['config']['batch']}, {report['config']['size']}px")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), force=True)
    finally:
        plt.close(fig)
    return {"file": path.name}


def failures(report: dict) -> list[str]:
    """Every check that ran and failed (a dropped or skipped row is not a failure)."""
    out = [f"{n} equivalence" for n, e in report["equivalence"].items() if e.get("passed") is False]
    onnx = report["onnx"] if "skipped" not in report["onnx"] else {}
    out += [f"{n} ONNX" for n, r in onnx.items() if r.get("passed") is False]
    for name, precs in report["tensorrt"].get("rows", {}).items():
        out += [f"{name} TensorRT {p}" for p, r in precs.items() if r.get("passed") is False]
    return out


# ---------------------------------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gpu_report.py", description=__doc__.split("\n")[0], epilog=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for report.md, report.json, report.png")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the whole run (default 300)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:N or cpu")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="models of the speed table")
    p.add_argument("--trt-models", nargs="*", default=["repvgg_a0", "repvgg_b0"],
                   help="models exported to ONNX and built as TensorRT engines (none: skip)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
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
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device") from None
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--device must be cpu or cuda, not {args.device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    existing = [out / n for n in ("report.md", "report.json", "report.png") if (out / n).exists()]
    if existing and not args.force:
        raise UsageError(f"{existing[0]}: already exists (use --force to overwrite)")
    return device


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = _check(args)
        budget = TimeBudget(args.budget_s, start=_T0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from repvgg_tools.checkpoint import atomic_write

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows: the paper's fp32; fp16 autocast is unaffected
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    report = run(args, device, budget)
    report["plot"] = plot(report, out / "report.png")
    report["failures"] = failures(report)
    report["budget"]["elapsed_s"] = budget.elapsed()
    text = render(report)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text), force=True)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1, default=str)),
                 force=True)
    print(text)
    print(f"wrote {out / 'report.md'}, report.json" + (", report.png" if "file" in report["plot"] else "")
          + f" in {budget.elapsed():.1f} s", file=sys.stderr)
    if report["failures"]:
        print("error: checks failed: " + ", ".join(report["failures"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
