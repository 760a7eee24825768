"""tools/build_trt.py: argument handling, build planning per backend version, and real TensorRT-RTX builds on CPU.

The real builds run in subprocesses: a TensorRT runtime must never be created in the pytest process (without a
driver it can crash it).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import onnx  # noqa: F401  (declared in .[all]: a broken install fails loudly)
import pytest
import torch

from repvgg_tools import randomize_batchnorm, reparameterize  # noqa: E402
from repvgg_tools.export.calibration import calibration_images  # noqa: E402
from repvgg_tools.export.int8 import quantize_int8  # noqa: E402
from repvgg_tools.export.onnx import export_onnx, save_onnx  # noqa: E402
from repvgg_tools.export.precision import to_fp16  # noqa: E402
from repvgg_tools.export.tensorrt import (  # noqa: E402
    Backend,
    BackendUnavailable,
    BuildRefused,
    batch_profile,
    load_backend,
    plan_build,
)
from repvgg_tools.models import RepVGG  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUILD_TRT = ROOT / "tools" / "build_trt.py"  # the shim, run from this checkout as documented
CHECKOUT_ENV = dict(os.environ, PYTHONPATH=str(ROOT))
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed (pip install tensorrt-rtx)")


def run_tool(*args, env=None):
    return subprocess.run([sys.executable, str(BUILD_TRT), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env or CHECKOUT_ENV)


def assert_one_line_error(proc, rc, fragment):
    assert proc.returncode == rc, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """fp32, fp16 and int8 (Q/DQ) ONNX files of a tiny RepVGG with a dynamic batch, and an fp32 fixed-batch one."""
    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = reparameterize(randomize_batchnorm(RepVGG((8, 16, 16, 32, 64), (1, 1, 2, 2, 1), num_classes=10)).eval())
    fp32 = export_onnx(model, 32)
    files = {"fp32": fp32, "fp16": to_fp16(fp32), "int8": quantize_int8(fp32, calibration_images("digits", 32, 16)),
             "fixed": export_onnx(model, 32, batch=4, dynamic_batch=False)}
    return {name: save_onnx(proto, d / f"{name}.onnx") for name, proto in files.items()}


# ------------------------------------------------------------------------------------------- planning (no TRT)
def _backend(name, version, flags):
    return Backend(name, SimpleNamespace(BuilderFlag=SimpleNamespace(**{f: i for i, f in enumerate(flags)})), version)


RTX = _backend("tensorrt_rtx", "1.7.1.116", ["TF32"])
TRT10 = _backend("tensorrt", "10.13.0.35", ["FP16", "INT8", "TF32"])
TRT11 = _backend("tensorrt", "11.0.0.1", ["TF32"])


@pytest.mark.parametrize("backend", [RTX, TRT10, TRT11], ids=["rtx", "trt10", "trt11"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_takes_precision_from_the_onnx(backend, precision):
    for requested in ("auto", precision):
        plan = plan_build(backend, requested, precision)
        assert (plan.precision, plan.strongly_typed, plan.flags) == (precision, True, [])


def test_plan_fp16_flag_only_on_tensorrt10():
    plan = plan_build(TRT10, "fp16", "fp32")
    assert (plan.precision, plan.strongly_typed, plan.flags) == ("fp16", False, ["FP16"])
    for backend in (RTX, TRT11):
        with pytest.raises(BuildRefused, match="strongly typed.*--precision fp16"):
            plan_build(backend, "fp16", "fp32")


@pytest.mark.parametrize("backend", [RTX, TRT10, TRT11], ids=["rtx", "trt10", "trt11"])
def test_plan_refuses_what_it_cannot_honour(backend):
    with pytest.raises(BuildRefused, match="Q/DQ.*--precision int8"):
        plan_build(backend, "int8", "fp32")  # no calibrator path, never a silent fp32 engine
    with pytest.raises(BuildRefused, match="this ONNX is fp16.*--precision fp32"):
        plan_build(backend, "fp32", "fp16")
    with pytest.raises(BuildRefused, match="this ONNX is int8.*--precision fp16"):
        plan_build(backend, "fp16", "int8")
    with pytest.raises(BuildRefused, match="unknown precision"):
        plan_build(backend, "bf16", "fp32")


def test_batch_profile():
    assert batch_profile("batch", None, None, None) == (1, 8, 32)
    assert batch_profile("batch", 2, 4, 16) == (2, 4, 16)
    assert batch_profile("batch", 64, None, None) == (64, 64, 64)
    assert batch_profile("batch", None, None, 4) == (1, 4, 4)
    assert batch_profile(4, None, None, None) == (4, 4, 4)
    assert batch_profile(4, 4, 4, 4) == (4, 4, 4)
    with pytest.raises(BuildRefused, match="1 <= min <= opt <= max"):
        batch_profile("batch", 8, 4, 16)
    with pytest.raises(BuildRefused, match="1 <= min <= opt <= max"):
        batch_profile("batch", 0, None, None)
    with pytest.raises(BuildRefused, match="fixed batch of 4"):
        batch_profile(4, None, None, 8)


def test_load_backend_errors():
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        load_backend("onnxruntime")


# ----------------------------------------------------------------------------------------- the tool, no backend
def _usable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def test_missing_tensorrt_backend_is_one_line_error(onnx_files, tmp_path):
    if _usable("tensorrt"):
        pytest.skip("tensorrt is usable here; this test covers machines without it")
    engine = tmp_path / "m.engine"
    proc = run_tool("--onnx", onnx_files["fp32"], "--engine", engine, "--backend", "tensorrt")
    assert_one_line_error(proc, 2, "no usable TensorRT backend (tensorrt:")
    assert list(tmp_path.iterdir()) == []


def test_no_backend_at_all(onnx_files, tmp_path):
    """With neither package importable (shadowed by modules that raise ImportError), nothing is written."""
    shadow = tmp_path / "shadow"
    for name in ("tensorrt", "tensorrt_rtx"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed (simulated)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), str(ROOT)]))
    out = tmp_path / "out"
    out.mkdir()
    proc = run_tool("--onnx", onnx_files["fp32"], "--engine", out / "m.engine", env=env)
    assert_one_line_error(proc, 2, "no usable TensorRT backend")
    assert "tensorrt_rtx is not installed (simulated)" in proc.stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_argument_errors(onnx_files, tmp_path):
    engine = tmp_path / "m.engine"
    assert_one_line_error(run_tool("--onnx", onnx_files["fp32"]), 2, "--engine")
    assert_one_line_error(run_tool("--onnx", tmp_path / "none.onnx", "--engine", engine), 2, "no such file")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    assert_one_line_error(run_tool("--onnx", garbage, "--engine", engine), 2, "not a readable ONNX model")
    assert_one_line_error(run_tool("--onnx", onnx_files["fp32"], "--engine", engine, "--min-batch", 8,
                                   "--max-batch", 4), 2, "1 <= min <= opt <= max")
    assert_one_line_error(run_tool("--onnx", onnx_files["fixed"], "--engine", engine, "--max-batch", 8), 2,
                          "fixed batch of 4")
    assert_one_line_error(run_tool("--onnx", onnx_files["fp32"], "--engine", engine, "--precision", "tf32"), 2,
                          "invalid choice")
    assert_one_line_error(run_tool("--onnx", onnx_files["fp32"], "--engine", tmp_path / "no" / "m.engine"), 2,
                          "does not exist")
    engine.write_text("keep")
    assert_one_line_error(run_tool("--onnx", onnx_files["fp32"], "--engine", engine), 2, "already exists")
    assert engine.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx", "m.engine"]


# ------------------------------------------------------------------------------------ real builds: TensorRT-RTX
@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_rtx_builds_each_precision_with_dynamic_batch(onnx_files, tmp_path, precision):
    engine = tmp_path / f"{precision}.engine"
    proc = run_tool("--onnx", onnx_files[precision], "--engine", engine, "--backend", "tensorrt_rtx",
                    "--min-batch", 1, "--opt-batch", 4, "--max-batch", 16, "--workspace-mb", 256)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tensorrt_rtx" in proc.stdout and precision in proc.stdout
    info = json.loads(Path(f"{engine}.json").read_text())
    assert engine.stat().st_size == info["engine_bytes"] > 10_000
    assert info["backend"] == "tensorrt_rtx" and info["version"].split(".")[0].isdigit()
    assert (info["precision"], info["onnx_precision"], info["strongly_typed"]) == (precision, precision, True)
    assert info["builder_flags"] == [] and not info["tf32"] and info["workspace_mb"] == 256
    assert info["profiles"] == [{"input": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}}]
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}]
    assert info["build_seconds"] > 0
    assert info["gpu"] is None or isinstance(info["gpu"], str)
    assert sorted(p.name for p in tmp_path.iterdir()) == [engine.name, f"{engine.name}.json"]


@needs_rtx
def test_rtx_refuses_fp16_from_fp32_onnx(onnx_files, tmp_path):
    proc = run_tool("--onnx", onnx_files["fp32"], "--engine", tmp_path / "m.engine", "--backend", "tensorrt_rtx",
                    "--precision", "fp16")
    assert_one_line_error(proc, 2, "--precision fp16")
    assert "strongly typed" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_rtx_fixed_batch_and_force(onnx_files, tmp_path):
    engine = tmp_path / "fixed.engine"
    engine.write_bytes(b"old")
    proc = run_tool("--onnx", onnx_files["fixed"], "--engine", engine, "--backend", "auto", "--force")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(Path(f"{engine}.json").read_text())
    assert info["profiles"] == [{"input": {"min": [4, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [4, 3, 32, 32]}}]
    assert engine.read_bytes() != b"old" and info["engine_bytes"] == engine.stat().st_size
    assert onnx.load(onnx_files["fixed"]).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
