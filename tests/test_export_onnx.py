"""repvgg-export and the ONNX library: plain graphs, dynamic batch, every precision verified on onnxruntime CPU."""

import json

import numpy as np
import onnx  # noqa: F401  (declared in .[all]: a broken install fails loudly)
import onnxruntime  # noqa: F401  (declared in .[all]: a broken install fails loudly)
import pytest
import torch
from cli_helpers import run_export
from convert_helpers import EXPORT_TINY as TINY
from convert_helpers import export_tiny
from torch import nn

from repvgg_tools import randomize_batchnorm, reparameterize, save_checkpoint  # noqa: E402
from repvgg_tools.export.onnx import (  # noqa: E402
    PLAIN_OPS,
    drop_identity_pools,
    export_onnx,
    onnx_session,
    op_counts,
    run_onnx,
)
from repvgg_tools.models import RepVGG  # noqa: E402

RELU_NET_OPS = {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}  # PLAIN_OPS without VGG's MaxPool



def assert_one_line_error(proc, rc, fragment):
    assert proc.returncode == rc, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_model():
    return export_tiny(3)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory):
    """A training-form checkpoint (multi-branch, randomized BN) of a tiny custom RepVGG."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_train.pth"
    save_checkpoint({"state_dict": tiny_model.state_dict(), "num_classes": 10, "epoch": 3}, path)
    return path


# ------------------------------------------------------------------------------------------------ the library
def test_training_graph_is_not_plain_but_deploy_graph_is(tiny_model):
    training = op_counts(export_onnx(tiny_model, 32))  # the simplifier keeps the branches and identity BNs
    assert training["Conv"] == 14 and training["Add"] == 9 and training["BatchNormalization"] == 2
    deploy = export_onnx(reparameterize(tiny_model), 32)
    ops = op_counts(deploy)
    assert set(ops) == RELU_NET_OPS and set(ops) <= PLAIN_OPS
    assert ops["Conv"] == 7 and ops["Relu"] == 7
    onnx.checker.check_model(deploy, full_check=True)


def test_identity_pool_dropped_only_when_it_copies():
    class Head(nn.Module):  # VGG's shape: convs, adaptive 7x7 average pool, flatten, linear
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d((7, 7))
            self.fc = nn.Linear(4 * 49, 5)

        def forward(self, x):
            return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))

    model = Head().eval()
    raw = export_onnx(model, 7, simplify_graph=False)
    assert "AveragePool" in op_counts(raw)  # at 7x7 the adaptive pool exports as a 1x1 average pool
    plain = drop_identity_pools(raw)
    assert "AveragePool" not in op_counts(plain)
    onnx.checker.check_model(plain)
    x = torch.randn(3, 3, 7, 7)
    np.testing.assert_allclose(run_onnx(onnx_session(plain), x)[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    real_pool = export_onnx(model, 14)  # 14 -> 7 is a real 2x2 pool and stays
    assert op_counts(real_pool)["AveragePool"] == 1


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_fp32_plain_dynamic_single_file(tiny_model, tiny_ckpt, tmp_path):
    out, report_path = tmp_path / "model.onnx", tmp_path / "report.json"
    before = tiny_ckpt.read_bytes()
    proc = run_cli(tiny_ckpt, out, "--input-size", 32, "--json", report_path, check_rc=0)
    assert "verification" in proc.stdout and "ok" in proc.stdout
    assert tiny_ckpt.read_bytes() == before  # input untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json"]  # one file, no .data
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    ops = op_counts(model)
    assert set(ops) == RELU_NET_OPS
    assert not {"BatchNormalization", "Add"} & set(ops)
    assert model.opset_import[0].version == 18
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    session = onnx_session(out)
    deploy = reparameterize(tiny_model).eval()
    for n in (1, 5):  # dynamic batch
        x = torch.randn(n, 3, 32, 32)
        got = run_onnx(session, x)[0]
        ref = deploy(x).detach().numpy()
        assert got.shape == (n, 10)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    report = json.loads(report_path.read_text())
    assert report["file_bytes"] == out.stat().st_size and report["written"]
    assert report["ops"] == dict(ops) and report["precision"] == "fp32"
    v = report["verification"]
    assert v["passed"] and v["max_rel"] <= 1e-4 and v["samples"] == 8
    assert report["io"]["inputs"][0] == {"name": "input", "dtype": "float32", "shape": ["batch", 3, 32, 32]}


def test_cli_fixed_batch_opset_no_simplify(tiny_ckpt, tmp_path):
    out = tmp_path / "fixed.onnx"
    run_cli(tiny_ckpt, out, "--input-size", 32, "--batch", 4, "--no-dynamic-batch", "--opset", 17,
            "--no-simplify", check_rc=0)
    model = onnx.load(out)
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 32, 32]
    assert model.opset_import[0].version == 17
    session = onnx_session(out)
    assert run_onnx(session, torch.randn(4, 3, 32, 32))[0].shape == (4, 10)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run_onnx(session, torch.randn(2, 3, 32, 32))


def test_cli_deploy_checkpoint(tiny_model, tmp_path):
    ckpt = tmp_path / "deploy.safetensors"
    save_checkpoint(reparameterize(tiny_model).state_dict(), ckpt)
    out = tmp_path / "d.onnx"
    run_cli(ckpt, out, "--input-size", 32, check_rc=0)
    assert set(op_counts(onnx.load(out))) == RELU_NET_OPS


@pytest.mark.slow
def test_cli_fp16(tiny_model, tiny_ckpt, tmp_path):
    out, report_path = tmp_path / "half.onnx", tmp_path / "half.json"
    run_cli(tiny_ckpt, out, "--input-size", 32, "--precision", "fp16", "--json", report_path, check_rc=0)
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 IO by default
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer if t.dims)
    v = json.loads(report_path.read_text())["verification"]
    assert v["passed"] and v["cosine"] >= 0.9999 and v["top1_agreement"] >= 0.99
    out_io = tmp_path / "half_io.onnx"
    run_cli(tiny_ckpt, out_io, "--input-size", 32, "--precision", "fp16", "--fp16-io", check_rc=0)
    session = onnx_session(out_io)
    assert session.get_inputs()[0].type == "tensor(float16)" and session.get_outputs()[0].type == "tensor(float16)"
    x = torch.randn(3, 3, 32, 32)
    ref = reparameterize(tiny_model)(x).detach().numpy()
    got = run_onnx(session, x)[0].astype(np.float64)
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow
def test_cli_fp16_overflow_fails_verification(tiny_model, tmp_path):
    """A model whose activations pass fp16's 65504 cannot be fp16: exit 1, nothing written."""
    big = RepVGG(**TINY)
    big.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        big.stem.branch_3x3.conv.weight.mul_(1e5)
    ckpt, out = tmp_path / "big.pth", tmp_path / "big.onnx"
    save_checkpoint({"state_dict": big.state_dict()}, ckpt)
    proc = run_cli(ckpt, out, "--input-size", 32, "--precision", "fp16", "--json", tmp_path / "r.json")
    assert_one_line_error(proc, 1, "beyond fp16's range")
    assert not out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["written"] and not report["verification"]["passed"]
    run_cli(ckpt, out, "--input-size", 32, check_rc=0)  # the same model is fine in fp32


# int8: tests/test_int8.py (Q/DQ placement, calibration sources, the int8 check and its CLI)


def test_cli_features(tiny_model, tiny_ckpt, tmp_path):
    out = tmp_path / "feat.onnx"
    run_cli(tiny_ckpt, out, "--input-size", 64, "--features", "--out-indices", 1, 2, 3, 4, check_rc=0)
    model = onnx.load(out)
    assert [o.name for o in model.graph.output] == ["feat0", "feat1", "feat2", "feat3"]
    assert set(op_counts(model)) == {"Conv", "Relu"}
    deploy = reparameterize(tiny_model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the stage outputs, computed by hand
        feats, h = [], deploy.stem(x)
        for stage in deploy.stages:
            h = stage(h)
            feats.append(h)
    got = run_onnx(onnx_session(out), x)
    assert [g.shape for g in got] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4), (2, 64, 2, 2)]
    for g, f in zip(got, feats, strict=True):
        assert np.abs(g - f.numpy()).max() <= 1e-4 * np.abs(f.numpy()).max()


@pytest.mark.slow
def test_cli_features_registered_arch(tmp_path):
    """A zoo model goes through create_model(features_only=True) and load_backbone_weights."""
    from repvgg_tools import create_model

    model = randomize_batchnorm(create_model("repvgg_a0", num_classes=10), seed=2).eval()
    ckpt, out = tmp_path / "a0.pth", tmp_path / "a0_feat.onnx"
    save_checkpoint({"state_dict": model.state_dict(), "arch": "repvgg_a0", "num_classes": 10}, ckpt)
    proc = run_cli(ckpt, out, "--input-size", 64, "--features", "--out-indices", 2, 4, "--json", tmp_path / "r.json",
                   check_rc=0)
    assert "repvgg_a0" in proc.stdout
    outputs = onnx.load(out).graph.output
    shapes = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in outputs]
    assert shapes == [["batch", 96, 8, 8], ["batch", 1280, 2, 2]]
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["max_rel"] <= 1e-4


@pytest.mark.slow
def test_cli_errors(tiny_ckpt, tmp_path):
    out = tmp_path / "x.onnx"
    assert_one_line_error(run_cli(tmp_path / "missing.pth", out), 2, "no such file")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(run_cli(text, out), 2, "notes.txt")
    assert_one_line_error(run_cli(tiny_ckpt, out, "--precision", "bf16"), 2, "invalid choice")
    assert_one_line_error(run_cli(tiny_ckpt, out, "--fp16-io"), 2, "--fp16-io needs --precision fp16")
    assert_one_line_error(run_cli(tiny_ckpt, out, "--out-indices", 1), 2, "--out-indices needs --features")
    assert_one_line_error(run_cli(tiny_ckpt, out, "--calib-samples", 8), 2, "need --precision int8")
    assert_one_line_error(run_cli(tiny_ckpt, out, "--arch", "resnet50"), 2, "resnet50")
    assert_one_line_error(run_cli(tiny_ckpt, tiny_ckpt), 2, "is the input file")
    assert_one_line_error(run_cli(tiny_ckpt, out, "--json", tiny_ckpt), 2, "is the input file")
    assert_one_line_error(run_cli(tiny_ckpt, tmp_path / "no" / "x.onnx"), 2, "does not exist")
    assert not out.exists()
    out.write_text("keep me")
    assert_one_line_error(run_cli(tiny_ckpt, out, "--input-size", 32), 2, "already exists")
    assert out.read_text() == "keep me"
    run_cli(tiny_ckpt, out, "--input-size", 32, "--force", "--no-verify", "-q", check_rc=0)
    assert set(op_counts(onnx.load(out))) == RELU_NET_OPS
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left behind


def run_cli(*args, check_rc=None):
    """``repvgg-export ARGS``; with ``check_rc``, the exit code must be that."""
    proc = run_export(*args, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc
