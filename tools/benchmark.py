#!/usr/bin/env python
"""Benchmark RepVGG/VGG forms on this machine: parameters, FLOPs, CPU latency and throughput of the training form,
the deploy form (NCHW and channels_last), timm's same model and onnxruntime, all in one run; optionally checkpoint
conversion (ours vs timm) and TensorRT on a GPU. Writes ``report.md``, ``report.json`` and ``report.png``.

Examples:
    python tools/benchmark.py                                   # repvgg_a0 repvgg_b0 vgg16, batch 8, 224x224
    python tools/benchmark.py --models repvgg_a0 --batch 1 --size 64 --iters 2 --out /tmp/bench
    python tools/benchmark.py --models repvgg_b3 --conversion   # + conversion time and peak RAM vs timm
    python tools/benchmark.py --trt                             # + TensorRT (needs CUDA and a TensorRT backend)
    python tools/benchmark.py --fuser --threads 1               # graph fuser vs timm's reparameterize_model only
    python tools/benchmark.py --fuser --fuser-models mobileone_s1 repvit_m1   # other timm families
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from repvgg_tools.bench.timing import count_flops, time_callable, time_cuda  # noqa: E402
from repvgg_tools.cli.common import Parser, error, run_command  # noqa: E402  (needs the path above)

TIMM_NAMES = {"repvgg_a0": "repvgg_a0", "repvgg_a1": "repvgg_a1", "repvgg_a2": "repvgg_a2", "repvgg_b0": "repvgg_b0",
              "repvgg_b1": "repvgg_b1", "repvgg_b1g4": "repvgg_b1g4", "repvgg_b2": "repvgg_b2",
              "repvgg_b2g4": "repvgg_b2g4", "repvgg_b3": "repvgg_b3", "repvgg_b3g4": "repvgg_b3g4",
              "repvgg_d2se": "repvgg_d2se", "vgg11": "vgg11", "vgg13": "vgg13", "vgg16": "vgg16", "vgg19": "vgg19",
              "vgg11_bn": "vgg11_bn", "vgg13_bn": "vgg13_bn", "vgg16_bn": "vgg16_bn", "vgg19_bn": "vgg19_bn"}


def matmul_peak(n: int = 2048, iters: int = 5) -> float:
    """Measured fp32 matmul GFLOP/s of this machine (median of ``iters`` ``n x n`` products)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    lat = time_callable(lambda: torch.mm(a, b), iters, 2)["median_ms"]
    return 2 * n**3 / (lat / 1e3) / 1e9


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_torch(model, x, iters: int, warmup: int, channels_last: bool = False) -> dict:
    model = model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return time_callable(lambda: model(x), iters, warmup)


def bench_onnx(deploy, x, size: int, iters: int, warmup: int) -> dict:
    from repvgg_tools.export.onnx import export_onnx, onnx_session

    proto = export_onnx(deploy, size, batch=x.shape[0])
    session = onnx_session(proto, threads=torch.get_num_threads())
    del proto
    name, arr = session.get_inputs()[0].name, x.numpy()
    return time_callable(lambda: session.run(None, {name: arr}), iters, warmup)


def bench_model(name: str, args) -> dict:
    """Every CPU row for one model."""
    from repvgg_tools import create_model, randomize_batchnorm, reparameterize

    x = torch.randn(args.batch, 3, args.size, args.size)
    train_form = randomize_batchnorm(create_model(name), seed=0).eval()
    deploy = reparameterize(train_form)
    rows = {}
    flops = count_flops(deploy, args.size)
    rows["ours training"] = {"params": params(train_form), **bench_torch(train_form, x, args.iters, args.warmup)}
    rows["ours deploy NCHW"] = {"params": params(deploy), **bench_torch(deploy, x, args.iters, args.warmup)}
    rows["ours deploy channels_last"] = {"params": params(deploy),
                                         **bench_torch(deploy, x, args.iters, args.warmup, channels_last=True)}
    deploy = deploy.to(memory_format=torch.contiguous_format)
    if not args.no_onnx:
        try:
            rows["onnxruntime (deploy)"] = {"params": params(deploy),
                                            **bench_onnx(deploy, x, args.size, args.iters, args.warmup)}
        except Exception as exc:  # a missing extra or an exporter failure should not cost the other rows
            rows["onnxruntime (deploy)"] = {"error": str(exc).splitlines()[0]}
    # what a user gets from repvgg_tools.runtime: the backend chosen by measurement, then timed like the others
    from repvgg_tools.runtime import fastest_cpu_runner

    runner = fastest_cpu_runner(deploy, x, backends=("torch", "torch_channels_last")
                                + (() if args.no_onnx else ("onnxruntime",)), iters=max(3, args.iters // 3))
    rows[f"ours auto ({runner.backend})"] = {"params": params(deploy),
                                             **time_callable(lambda: runner(x), args.iters, args.warmup)}
    del train_form
    if not args.no_timm and name in TIMM_NAMES:
        try:
            import timm
            from timm.utils.model import reparameterize_model

            tm = timm.create_model(TIMM_NAMES[name], pretrained=False).eval()
            rows["timm training"] = {"params": params(tm), **bench_torch(tm, x, args.iters, args.warmup)}
            td = reparameterize_model(tm)
            rows["timm deploy"] = {"params": params(td), **bench_torch(td, x, args.iters, args.warmup)}
            del tm, td
        except Exception as exc:
            rows["timm"] = {"error": str(exc).splitlines()[0]}
    for row in rows.values():
        if "median_ms" in row:
            row["images_per_s"] = args.batch / (row["median_ms"] / 1e3)
            row["gflops_per_s"] = flops * args.batch / (row["median_ms"] / 1e3) / 1e9
    return {"flops": flops, "rows": rows}


CONVERT_OURS = """
import json, sys, time
from repvgg_tools.conversion.api import convert_file
def status(field):  # VmHWM is this process's own peak (ru_maxrss can carry the parent's across fork+exec)
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
base = status('VmRSS'); t0 = time.perf_counter()
convert_file(sys.argv[1], sys.argv[2], verify=False, force=True)
dt = time.perf_counter() - t0
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak_above_baseline": peak - base}))
"""

CONVERT_FLOOR = """
import json, sys, time, torch
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
base = status('VmRSS'); t0 = time.perf_counter()
torch.save(torch.load(sys.argv[1], weights_only=True, mmap=True), sys.argv[2])
dt = time.perf_counter() - t0
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak_above_baseline": peak - base}))
"""

CONVERT_TIMM = """
import json, sys, time, torch, timm
from timm.models import load_checkpoint
from timm.utils.model import reparameterize_model
def status(field):  # VmHWM is this process's own peak (ru_maxrss can carry the parent's across fork+exec)
    for line in open('/proc/self/status'):
        if line.startswith(field): return int(line.split()[1]) * 1024
base = status('VmRSS'); t0 = time.perf_counter()
model = timm.create_model(sys.argv[3], pretrained=False)
load_checkpoint(model, sys.argv[1], weights_only=True)
model = reparameterize_model(model.eval())
torch.save(model.state_dict(), sys.argv[2])
dt = time.perf_counter() - t0
peak = status('VmHWM')
print(json.dumps({"seconds": dt, "peak_above_baseline": peak - base}))
"""


def bench_conversion(arch: str = "repvgg_b3") -> dict:
    """Convert one timm-layout training checkpoint of ``arch`` with ours (``convert_file``, no verify) and timm's
    path (build, load, reparameterize, save), each in its own process, next to the I/O floor (a plain
    ``torch.load(mmap=True)`` + ``torch.save`` of the same file); compare time, peak RSS and the results."""
    import timm

    from repvgg_tools import randomize_batchnorm

    with tempfile.TemporaryDirectory(prefix="repvgg-bench-") as tmp:
        src = Path(tmp) / f"{arch}_timm.pth"
        model = randomize_batchnorm(timm.create_model(TIMM_NAMES[arch], pretrained=False), seed=0)
        torch.save(model.state_dict(), src)
        del model
        result = {"arch": arch, "checkpoint_bytes": src.stat().st_size}
        outs = {}
        for label, code, extra in (("io_floor", CONVERT_FLOOR, []), ("ours", CONVERT_OURS, []),
                                   ("timm", CONVERT_TIMM, [TIMM_NAMES[arch]])):
            out = Path(tmp) / f"{label}.pth"
            proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), *extra], capture_output=True,
                                  text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode:
                result[label] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
                continue
            result[label] = json.loads(proc.stdout.strip().splitlines()[-1])
            if label != "io_floor":
                outs[label] = out
        if len(outs) == 2:
            a = torch.load(outs["ours"], weights_only=True, mmap=True)
            a = a.get("state_dict", a)
            b = torch.load(outs["timm"], weights_only=True, mmap=True)
            worst = 0.0
            for k, v in b.items():
                if k in a and v.is_floating_point():
                    worst = max(worst, ((a[k].double() - v.double()).abs().max() / v.double().abs().max()
                                        .clamp_min(1e-30)).item())
            result["same_keys"] = sorted(a) == sorted(b)
            result["max_rel_diff_ours_vs_timm"] = worst
    return result


def bench_trt(names: list[str], args) -> dict:
    """TensorRT engines (fp32, fp16) via ``repvgg_tools.export.tensorrt`` next to PyTorch eager on the GPU."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from repvgg_tools import create_model, reparameterize
    from repvgg_tools.export import tensorrt as trt
    from repvgg_tools.export.onnx import export_onnx, save_onnx
    from repvgg_tools.export.precision import to_fp16

    out: dict = {"gpu": torch.cuda.get_device_name(0)}
    try:
        backend = trt.load_backend("auto")
        out["backend"] = f"{backend.name} {backend.version}"
    except trt.TensorRTError as exc:
        backend, out["backend_error"] = None, str(exc)
    for name in names:
        deploy = reparameterize(create_model(name)).eval()
        res = {}
        x = torch.randn(args.batch, 3, args.size, args.size, device="cuda")
        for prec, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            m = deploy.cuda().to(dtype)
            xi = x.to(dtype)
            with torch.inference_mode():
                t = time_cuda(lambda m=m, xi=xi: m(xi), max(args.iters, 20), args.warmup)
            res[f"torch eager {prec}"] = {"p50": t["median_ms"], "p90": t["p90_ms"],
                                          "images_per_s": args.batch / (t["median_ms"] / 1e3)}
        deploy = deploy.float().cpu()
        if backend is not None:
            with tempfile.TemporaryDirectory() as tmp:
                proto = export_onnx(deploy, args.size, batch=args.batch)
                for prec in ("fp32", "fp16"):
                    path = Path(tmp) / f"{name}_{prec}.onnx"
                    save_onnx(proto if prec == "fp32" else to_fp16(proto), path)
                    try:
                        engine, _, _ = trt.build_engine(path, backend=backend, max_batch=args.batch)
                        r = trt.benchmark(engine, batch=args.batch, iters=max(args.iters, 50), backend=backend.name)
                        res[f"TensorRT {prec}"] = {**r["latency_ms"], "images_per_s": r["throughput"]}
                    except Exception as exc:
                        res[f"TensorRT {prec}"] = {"error": str(exc).splitlines()[0]}
        out[name] = res
    return out


def _ms(row: dict | None) -> float | None:
    return row.get("median_ms") if row else None


def summarize(name: str, res: dict) -> dict:
    """Ratios of one model: deploy vs training, ours vs timm, and the fastest deploy backend."""
    rows = res["rows"]
    deploy = {k: _ms(rows.get(k)) for k in ("ours deploy NCHW", "ours deploy channels_last", "onnxruntime (deploy)")}
    deploy = {k: v for k, v in deploy.items() if v}
    fastest = min(deploy, key=deploy.get)
    torch_best = min(v for k, v in deploy.items() if k.startswith("ours"))
    out = {"fastest_deploy": fastest, "torch_deploy_vs_fastest": deploy[fastest] / torch_best,
           "deploy_speedup_vs_training": _ms(rows["ours training"]) / deploy[fastest]}
    auto = next((k for k in rows if k.startswith("ours auto") and _ms(rows[k])), None)
    if auto:
        out["auto_vs_fastest"] = deploy[fastest] / _ms(rows[auto])
    if _ms(rows.get("timm training")):
        out["ours_vs_timm_training"] = _ms(rows["timm training"]) / _ms(rows["ours training"])
    if _ms(rows.get("timm deploy")):
        out["ours_vs_timm_deploy"] = _ms(rows["timm deploy"]) / deploy["ours deploy NCHW"]
        out["ours_best_vs_timm_deploy"] = _ms(rows["timm deploy"]) / deploy[fastest]
    return out


def write_report(report: dict, out: Path) -> None:
    from repvgg_tools.io.checkpoint import atomic_write

    m = report["machine"]
    lines = ["# repvgg-tools benchmark", "",
             f"{m['cpu']}, {m['threads']} torch threads, torch {m['torch']}, timm {m.get('timm', '-')}, onnxruntime "
             f"{m.get('onnxruntime', '-')}; batch {report['batch']}, {report['size']}x{report['size']}, "
             f"{report['iters']} timed iterations after {report['warmup']} warm-up (medians); load average before "
             f"the run {m['loadavg']}.", "",
             f"Measured fp32 matmul peak: **{m['peak_gflops']:.1f} GFLOP/s** (2048x2048 torch.mm).", "",
             "Speed ratios are > 1 when the first named is faster (ratio of median latencies).", ""]
    for name, res in report["models"].items():
        s = res["summary"]
        lines += [f"## {name}", "", f"{res['flops'] / 1e9:.3f} GFLOPs per image (2 x multiply-adds; "
                  f"{res['flops'] / 2e9:.3f} GMACs)", "",
                  "| form | params | latency median (ms) | p90 (ms) | images/s | GFLOP/s | % of matmul peak |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for form, row in res["rows"].items():
            if "error" in row:
                lines.append(f"| {form} | error: {row['error']} | | | | | |")
                continue
            lines.append(f"| {form} | {row['params']:,} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | "
                         f"{row['images_per_s']:.1f} | {row['gflops_per_s']:.1f} | "
                         f"{100 * row['gflops_per_s'] / m['peak_gflops']:.0f}% |")
        lines += ["", f"- deploy (fastest: {s['fastest_deploy']}) vs training: "
                      f"**{s['deploy_speedup_vs_training']:.2f}x**",
                  f"- best torch deploy form vs the fastest deploy backend: {s['torch_deploy_vs_fastest']:.2f}x"]
        if "auto_vs_fastest" in s:
            lines.append(f"- `repvgg_tools.runtime.fastest_cpu_runner` vs the fastest deploy backend: "
                         f"{s['auto_vs_fastest']:.2f}x (design target >= 0.95)")
        if "ours_vs_timm_training" in s:
            lines.append(f"- ours vs timm, training form: {s['ours_vs_timm_training']:.2f}x")
        if "ours_vs_timm_deploy" in s:
            lines.append(f"- ours vs timm, deploy form (both NCHW): {s['ours_vs_timm_deploy']:.2f}x; "
                         f"our fastest deploy vs timm deploy: {s['ours_best_vs_timm_deploy']:.2f}x")
        lines.append("")
    conv = report.get("conversion")
    if conv:
        lines += ["## Checkpoint conversion", "", f"{conv['arch']} training checkpoint (timm layout, "
                  f"{conv['checkpoint_bytes'] / 1e6:.0f} MB), each in its own process, peak RSS above the process's "
                  "RSS after imports.", "", "| converter | time (s) | peak RAM above baseline (MB) | x checkpoint |",
                  "|---|---:|---:|---:|"]
        names = {"io_floor": "I/O floor (`torch.load(mmap=True)` + `torch.save`)",
                 "ours": "ours (`convert_file(verify=False)`)",
                 "timm": "timm (create, load_checkpoint, reparameterize_model, save)"}
        for label in ("io_floor", "ours", "timm"):
            r = conv.get(label, {})
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} | | |")
            elif r:
                lines.append(f"| {names[label]}")
                lines[-1] += (f" | {r['seconds']:.2f} | {r['peak_above_baseline'] / 1e6:.0f} | "
                              f"{r['peak_above_baseline'] / conv['checkpoint_bytes']:.2f} |")
        times = {k: conv[k]["seconds"] for k in ("io_floor", "ours", "timm") if "seconds" in conv.get(k, {})}
        if {"io_floor", "ours", "timm"} <= set(times):
            lines += ["", f"Ours: {times['ours'] / times['io_floor']:.2f}x the I/O floor, "
                      f"{times['ours'] / times['timm']:.2f}x timm's time."]
        if "max_rel_diff_ours_vs_timm" in conv:
            lines += ["", f"Same keys: {conv['same_keys']}; max relative difference of the fused tensors, ours vs "
                      f"timm: {conv['max_rel_diff_ours_vs_timm']:.2e}.", ""]
    trt = report.get("trt")
    if trt:
        lines += ["## GPU (--trt)", ""]
        if "skipped" in trt:
            lines.append(f"Skipped: {trt['skipped']}.")
        else:
            lines.append(f"{trt['gpu']}; backend: {trt.get('backend', trt.get('backend_error'))}")
            lines += ["", "| model | engine | p50 (ms) | p90 (ms) | images/s |", "|---|---|---:|---:|---:|"]
            for name in report["models"]:
                for eng, r in trt.get(name, {}).items():
                    if "error" in r:
                        lines.append(f"| {name} | {eng} | error: {r['error']} | | |")
                    else:
                        lines.append(f"| {name} | {eng} | {r['p50']:.3f} | {r['p90']:.3f} | {r['images_per_s']:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(text), force=True)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)), force=True)


def plot_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repvgg_tools.io.checkpoint import atomic_write

    names = list(report["models"])
    forms = []
    for res in report["models"].values():
        forms += [f for f, r in res["rows"].items() if "median_ms" in r and f not in forms]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(names) + 3), 4))
    width = 0.8 / max(len(forms), 1)
    for i, form in enumerate(forms):
        vals = [report["models"][n]["rows"].get(form, {}).get("images_per_s", 0) for n in names]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=form)
    ax.set_xticks([j + width * (len(forms) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("images/s (CPU)")
    ax.set_title(f"batch {report['batch']}, {report['size']}x{report['size']}, {report['machine']['threads']} threads")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(out / "report.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100), force=True)
    finally:
        plt.close(fig)


def machine_info() -> dict:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    for mod in ("timm", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


FUSER_MODELS = ("mobileone_s0", "fastvit_t8")


def bench_fuser(names=FUSER_MODELS, repeats: int = 7, size: int = 64) -> dict:
    """Our graph fuser (no timm methods) vs timm's ``reparameterize_model`` on the same model, ``repeats`` runs of
    each, interleaved, the garbage collector paused inside each timing (both return a new model and leave the
    input as it was: timm deep-copies it all, ours copies what the fused model keeps). Times and ratios are the
    fastest run of each side, as ``timeit`` advises (slower runs measure other processes on the machine); the
    medians are kept too. Also modules before/after, max rel error between the two results and what our fuser
    left unfused."""
    import gc
    import time
    from collections import Counter

    import timm
    from timm.utils.model import reparameterize_model

    from repvgg_tools import randomize_batchnorm
    from repvgg_tools.fx.fuser import graph_fuse
    from repvgg_tools.verify import compare_outputs

    def counts(m):
        kinds = Counter(type(q).__name__ for q in m.modules())
        bns = sum(isinstance(q, torch.nn.modules.batchnorm._BatchNorm) for q in m.modules())
        return {"Conv2d": kinds["Conv2d"], "BatchNorm": bns, "modules": sum(kinds.values())}

    rows = {}
    for name in names:
        torch.manual_seed(0)
        model = randomize_batchnorm(timm.create_model(name, pretrained=False), seed=0).eval()
        x = torch.randn(1, 3, size, size)
        t_timm, t_ours, t_whole = [], [], []

        def timed(times: list, fn, *args, **kwargs):
            gc.collect()  # as timeit: no collector pause inside one side's timing from the other's garbage
            gc.disable()
            try:
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                times.append(time.perf_counter() - start)
            finally:
                gc.enable()
            return out

        for _ in range(repeats):
            ref = timed(t_timm, reparameterize_model, model)
            ours, report = timed(t_ours, graph_fuse, model, (x,))
            timed(t_whole, graph_fuse, model, (x,), whole_model=True)
        with torch.no_grad():
            x = torch.randn(2, 3, size, size)
            rel = compare_outputs(ours(x), ref(x))[1]
        timm_s, ours_s, whole_s = min(t_timm), min(t_ours), min(t_whole)
        reasons = Counter(why.split(":", 1)[-1].strip()[:90] for _, why in report.unfused)
        medians = {"timm_s": statistics.median(t_timm), "ours_s": statistics.median(t_ours),
                   "whole_model_s": statistics.median(t_whole)}
        medians["ratio"] = medians["ours_s"] / medians["timm_s"]
        rows[name] = {"timm_s": timm_s, "ours_s": ours_s, "ratio": ours_s / timm_s, "whole_model_s": whole_s,
                      "whole_model_ratio": whole_s / timm_s, "median": medians, "before": counts(model),
                      "timm": counts(ref), "ours": counts(ours), "max_rel_vs_timm": rel,
                      "fused": len(report.fused), "unfused": dict(reasons.most_common(5)),
                      "skipped": [f"{w}: {why}" for w, why in report.skipped]}
    return rows


def fuser_markdown(rows: dict) -> str:
    lines = ["## Graph fuser vs timm reparameterize_model", "",
             "`ours`: fused modules replaced in place (the model keeps its class); `whole`: `graph_fuse(...,"
             " whole_model=True)` (the model becomes one GraphModule). Fastest of the interleaved runs (median ratio"
             " in the last column); both sides return a new model and leave the input as it was.", "",
             "| model | timm s | ours s | ratio | whole s | ratio | Conv2d/BN before | timm | ours | max rel vs timm "
             "| median ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        cb = [f"{r[k]['Conv2d']}/{r[k]['BatchNorm']}" for k in ("before", "timm", "ours")]
        lines.append(f"| {name} | {r['timm_s']:.3f} | {r['ours_s']:.3f} | {r['ratio']:.2f}x | "
                     f"{r['whole_model_s']:.3f} | {r['whole_model_ratio']:.2f}x | {cb[0]} | {cb[1]} | {cb[2]} | "
                     f"{r['max_rel_vs_timm']:.1e} | {r['median']['ratio']:.2f}x |")
    for name, r in rows.items():
        for why, n in r["unfused"].items():
            lines.append(f"- {name}: {n} left unfused: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="default: repvgg_a0 repvgg_b0 vgg16 (none with --fuser alone)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=20, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch/onnxruntime threads (default: torch's)")
    p.add_argument("--out", default="bench_out", help="directory for report.md/json/png")
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

    from repvgg_tools import list_models

    unknown = [n for n in args.models if n not in list_models()]
    if unknown or args.batch < 1 or args.size < 32 or args.iters < 1 or args.warmup < 0:
        msg = f"unknown model(s) {', '.join(unknown)}" if unknown else "--batch, --iters >= 1, --size >= 32"
        error(msg)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        error(f"{out} exists and is not a directory")
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
    if args.fuser:
        with open(out / "report.md", "a") as fh:
            fh.write("\n" + fuser_markdown(report["fuser"]))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
