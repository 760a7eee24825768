"""``repvgg-bench``'s model rows: parameters, FLOPs, latency and throughput of the training form, the deploy form
(NCHW and channels_last), onnxruntime, the measured-fastest runtime and timm's same model on the CPU; TensorRT and
PyTorch eager on a GPU; the ratios between them; the machine's description and matmul peak."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..io.errors import one_line
from .timing import count_flops, time_callable, time_cuda

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
            rows["onnxruntime (deploy)"] = {"error": one_line(exc)}
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
            rows["timm"] = {"error": one_line(exc)}
    for row in rows.values():
        if "median_ms" in row:
            row["images_per_s"] = args.batch / (row["median_ms"] / 1e3)
            row["gflops_per_s"] = flops * args.batch / (row["median_ms"] / 1e3) / 1e9
    return {"flops": flops, "rows": rows}


def bench_trt(names: list[str], args) -> dict:
    """TensorRT engines (fp32, fp16) via ``repvgg_tools.export.tensorrt`` next to PyTorch eager on the GPU."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from repvgg_tools import create_model, reparameterize
    from repvgg_tools.export import tensorrt as trt
    from repvgg_tools.export import trt_runtime
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
                        r = trt_runtime.benchmark(engine, batch=args.batch, iters=max(args.iters, 50),
                                                  backend=backend.name)
                        res[f"TensorRT {prec}"] = {**r["latency_ms"], "images_per_s": r["throughput"]}
                    except Exception as exc:
                        res[f"TensorRT {prec}"] = {"error": one_line(exc)}
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
