"""TensorRT engines on a GPU: build with tools/build_trt.py, run with EngineRunner, compare with PyTorch, benchmark.

Skipped only without CUDA (no TensorRT runtime is ever created on a CPU-only machine) or when neither tensorrt nor
tensorrt_rtx imports. Any other TensorRT error (an engine that does not build or does not run) fails. The int8 engine
is held to the documented int8 floors (``Int8Floors``) on held-out digits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from convert_helpers import EXPORT_TINY as TINY

from repvgg_tools.export.calibration import MIN_HELD_OUT
from repvgg_tools.export.int8 import Int8Floors, int8_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (TensorRT engines run on CUDA only)"),
]

ROOT = Path(__file__).resolve().parents[1]


def _usable_backend() -> str | None:
    for name in ("tensorrt", "tensorrt_rtx"):
        if subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0:
            return name
    return None


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A tiny trained-shape RepVGG (randomized BN) and engines built from its fp32, fp16 and int8 ONNX files."""
    backend = _usable_backend()
    if backend is None:
        pytest.skip("neither tensorrt nor tensorrt_rtx imports")
    from repvgg_tools import randomize_batchnorm, reparameterize
    from repvgg_tools.export.calibration import calibration_images
    from repvgg_tools.export.int8 import quantize_int8
    from repvgg_tools.export.onnx import export_onnx, save_onnx
    from repvgg_tools.export.precision import to_fp16
    from repvgg_tools.models import RepVGG

    d = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    model = reparameterize(randomize_batchnorm(RepVGG(**TINY), seed=4).eval())
    fp32 = export_onnx(model, 32)
    protos = {"fp32": fp32, "fp16": to_fp16(fp32), "int8": quantize_int8(fp32, calibration_images("digits", 32, 64))}
    paths = {}
    for precision, proto in protos.items():
        onnx_path, engine = save_onnx(proto, d / f"{precision}.onnx"), d / f"{precision}.engine"
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "build_trt.py"), "--onnx", str(onnx_path),
                               "--engine", str(engine), "--backend", backend, "--min-batch", "1", "--opt-batch", "8",
                               "--max-batch", "16", "--timing-cache", str(d / "timing.cache")],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if proc.returncode != 0:
            pytest.fail(f"{backend} could not build the {precision} engine: {proc.stderr.strip()[-500:]}")
        paths[precision] = engine
    return model, backend, paths, d


def test_sidecar_records_the_gpu(engines):
    _, backend, paths, d = engines
    info = json.loads(Path(f"{paths['fp16']}.json").read_text())
    assert info["gpu"] == torch.cuda.get_device_name(0) and info["backend"] == backend
    assert info["precision"] == "fp16" and info["timing_cache"]
    assert (d / "timing.cache").stat().st_size > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_pytorch_over_dynamic_batches(engines, precision):
    from repvgg_tools.export.trt_runtime import EngineRunner, compare

    model, backend, paths, _ = engines
    runner = EngineRunner(paths[precision], backend)
    assert runner.input_names == ["input"] and runner.output_names == ["logits"]
    assert runner.profile_shapes() == [(1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32)]
    gen = torch.Generator().manual_seed(0)
    if precision == "int8":  # calibrated on digits: compare on digits
        from repvgg_tools.export.calibration import calibration_images

        images = torch.as_tensor(calibration_images("digits", 32, 64 + MIN_HELD_OUT)[64:])  # never the calibration set
        inputs = [images[:1], images[1:6], *images[6:].split(16)]
    else:
        inputs = [torch.randn(n, 3, 32, 32, generator=gen) for n in (1, 5, 16)]
    result = compare(runner, model, inputs, precision)
    print(f"\n{backend} {precision} engine vs PyTorch: {result['summary']}")
    assert result["samples"] == (MIN_HELD_OUT if precision == "int8" else 22)
    assert result["passed"], result["summary"]
    if precision == "int8":
        # the documented int8 contract (Int8Floors, on the mean logit cosine) on held-out digits
        with torch.no_grad():
            cand = torch.cat([runner(x.cuda())[0].float().cpu() for x in inputs]).numpy()
            ref = torch.cat([model.float()(x) for x in inputs]).numpy()
        metrics, floors = int8_metrics([cand], [ref]), Int8Floors()
        assert metrics["samples"] == MIN_HELD_OUT and metrics["finite"], metrics
        assert metrics["top1_agreement"] >= floors.min_top1 and metrics["cosine_mean"] >= floors.min_cosine, metrics
        assert metrics["rel_error"] <= floors.max_rel_error, metrics
    out = runner(inputs[1].cuda())[0]
    assert out.shape == (5, 10) and out.is_cuda


def test_engine_matches_onnxruntime(engines):
    from repvgg_tools.export.onnx import onnx_session
    from repvgg_tools.export.trt_runtime import EngineRunner, compare

    _, backend, paths, _ = engines
    runner = EngineRunner(paths["fp32"], backend)
    session = onnx_session(paths["fp32"].with_suffix(".onnx"))
    result = compare(runner, session, [torch.randn(4, 3, 32, 32)], "fp32")
    assert result["passed"], result["summary"]


def test_batch_outside_profile_is_refused(engines):
    from repvgg_tools.export.trt_runtime import EngineRunner

    _, backend, paths, _ = engines
    runner = EngineRunner(paths["fp32"], backend)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner(torch.randn(17, 3, 32, 32, device="cuda"))


def test_benchmark(engines):
    from repvgg_tools.export.trt_runtime import benchmark

    _, backend, paths, _ = engines
    for precision in ("fp32", "fp16", "int8"):
        result = benchmark(paths[precision], batch=8, iters=20, warmup=5, backend=backend)
        lat = result["latency_ms"]
        print(f"\n{backend} {precision} batch 8: {result['throughput']:.0f} img/s, p50 {lat['p50']:.3f} ms, "
              f"p99 {lat['p99']:.3f} ms")
        assert result["batch"] == 8 and result["iters"] == 20 and result["throughput"] > 0
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    with pytest.raises(ValueError, match="outside the engine's profile"):
        benchmark(paths["fp32"], batch=64, iters=1, backend=backend)
