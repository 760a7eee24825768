"""The GPU report's run: plan every row (equivalence, throughput, ONNX, TensorRT engines), run them cheap first
within a :class:`~repvgg_tools.bench.budget.TimeBudget`, and collect the report's data. ``repvgg-gpu-report``
(:mod:`repvgg_tools.cli.gpu_report`) parses the arguments and writes the files."""

from __future__ import annotations

import sys
import time

import torch

from ..io.errors import one_line
from . import device_checks as checks
from .budget import Setup, Task, TimeBudget
from .device_report import FORMS, PAPER_IPS, PRECISIONS, ratios

TORCHVISION = checks.TORCHVISION_MODELS
TRT_PRECISIONS = ("fp32", "fp16", "int8")


TRT_PRIOR_S = 30.0  # guess for the first engine (export + build + check + timing) before one was measured




def _optional(name: str):
    """``(module, None)`` or ``(None, reason)`` for an optional package."""
    try:
        return __import__(name), None
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"{name} is not importable ({one_line(exc)})"


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
        put({"error": one_line(exc)})
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
            report["unavailable"][name] = f"could not build it to count its FLOPs ({one_line(exc)})"
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
