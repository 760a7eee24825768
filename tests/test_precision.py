"""Precision in the ONNX file: fp16 conversion, INT8 Q/DQ quantization, calibration images, verification metrics."""

import numpy as np
import onnx
import pytest
import torch
from convert_helpers import export_tiny
from onnx import TensorProto, numpy_helper

from repvgg_tools import reparameterize
from repvgg_tools.contract import FP16_MIN_COSINE, FP16_MIN_TOP1
from repvgg_tools.export.calibration import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIN_HELD_OUT,
    calibration_images,
    folder_images,
)
from repvgg_tools.export.int8 import Int8Floors, int8_metrics, quantize_int8
from repvgg_tools.export.metrics import check_metrics, max_activation, output_metrics
from repvgg_tools.export.onnx import export_onnx, onnx_session, run_onnx
from repvgg_tools.export.precision import PrecisionError, onnx_precision, to_fp16


@pytest.fixture(scope="module")
def tiny():
    """A deploy-form tiny RepVGG (randomized BN before fusing) and its fp32 ONNX at 32x32."""
    model = export_tiny(1)
    deploy = reparameterize(model).eval()
    return deploy, export_onnx(deploy, 32)


def _assert_int8_floors(cand: list, ref: np.ndarray) -> None:
    """The documented int8 contract (Int8Floors) on held-out images."""
    m, floors = int8_metrics(cand, [ref]), Int8Floors()
    assert m["finite"] and m["samples"] >= MIN_HELD_OUT, m
    assert m["top1_agreement"] >= floors.min_top1 and m["cosine_mean"] >= floors.min_cosine, m
    assert m["rel_error"] <= floors.max_rel_error, m


def _torch_out(model, x):
    with torch.no_grad():
        return model(x).double().numpy()


# ------------------------------------------------------------------------------------------------------ metrics
def test_metrics_identical_outputs():
    ref = np.random.default_rng(0).normal(size=(4, 10)) * 1e4
    m = output_metrics([ref.copy()], [ref])
    assert m["max_abs"] == 0 and m["max_rel"] == 0 and m["top1_agreement"] == 1.0 and m["finite"]
    assert m["cosine"] == pytest.approx(1.0)
    assert check_metrics(m, "fp32")[0] and check_metrics(m, "fp16")[0] and check_metrics(m, "int8")[0]


def test_metrics_relative_to_output_scale():
    ref = np.zeros((2, 10))
    ref[0, 3] = 1e4  # the output scale
    cand = ref.copy()
    cand[1, 5] += 0.5  # 5e-5 of the scale: within fp32's 1e-4
    m = output_metrics([cand], [ref])
    assert m["max_rel"] == pytest.approx(5e-5)
    assert check_metrics(m, "fp32")[0]
    cand[1, 5] += 1.5  # 2e-4: beyond it
    m = output_metrics([cand], [ref])
    passed, reason = check_metrics(m, "fp32")
    assert not passed and "2.000e-04" in reason


def test_metrics_top1_and_cosine():
    ref = np.eye(4, 10)
    cand = ref.copy()
    cand[2] = np.eye(1, 10, 7)  # sample 2 predicts class 7 instead of 2, orthogonal to the reference
    m = output_metrics([cand], [ref])
    assert m["top1_agreement"] == 0.75
    assert m["cosine"] == pytest.approx(0.0)
    passed, reason = check_metrics(m, "fp16")
    assert not passed and "top-1 agreement 75.0%" in reason
    assert check_metrics(m, "int8")[0]  # int8 agreement is reported, not enforced


def test_metrics_non_finite_and_shape_errors():
    ref = np.ones((2, 3))
    cand = ref.copy()
    cand[0, 0] = np.inf
    m = output_metrics([cand], [ref])
    assert not m["finite"]
    for precision in ("fp32", "fp16", "int8"):
        assert check_metrics(m, precision) == (False, "outputs contain NaN or Inf")
    with pytest.raises(ValueError, match="shapes differ"):
        output_metrics([np.ones((2, 4))], [ref])
    with pytest.raises(ValueError, match="count"):
        output_metrics([ref, ref], [ref])


def test_metrics_multi_output_cosine_per_sample():
    rng = np.random.default_rng(1)
    refs = [rng.normal(size=(3, 4, 2, 2)), rng.normal(size=(3, 8, 1, 1))]
    cands = [r.copy() for r in refs]
    cands[1][2] *= -1  # sample 2 of the second map flips sign: its concatenated cosine drops below 1
    m = output_metrics(cands, refs)
    assert m["top1_agreement"] is None
    assert m["cosine"] < 0.99


# -------------------------------------------------------------------------------------------------------- fp16
def test_fp16_keeps_fp32_io_and_matches_torch(tiny):
    model, proto = tiny
    half = to_fp16(proto)
    assert onnx_precision(proto) == "fp32" and onnx_precision(half) == "fp16"
    assert all(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer if t.dims)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.checker.check_model(half)
    x = torch.randn(16, 3, 32, 32)
    out = run_onnx(onnx_session(half), x)
    m = output_metrics(out, [_torch_out(model, x)])
    passed, reason = check_metrics(m, "fp16")
    assert passed, reason
    assert m["cosine"] >= FP16_MIN_COSINE and m["top1_agreement"] >= FP16_MIN_TOP1  # the documented fp16 floors
    assert 1e-6 < m["max_rel"]  # really computed in half precision


def test_fp16_check_rejects_a_wrong_model(tiny):
    """The same check on an fp16 file whose largest conv weight is 5% off: it must fail."""
    model, proto = tiny
    half = to_fp16(proto)
    weight = max((t for t in half.graph.initializer if len(t.dims) == 4), key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float16(1.05), weight.name))
    x = torch.randn(16, 3, 32, 32)
    m = output_metrics(run_onnx(onnx_session(half), x), [_torch_out(model, x)])
    passed, reason = check_metrics(m, "fp16")
    assert not passed and m["cosine"] < FP16_MIN_COSINE, reason


def test_fp16_io(tiny):
    model, proto = tiny
    half = to_fp16(proto, keep_io_types=False)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    session = onnx_session(half)
    assert session.get_inputs()[0].type == "tensor(float16)"
    x = torch.randn(4, 3, 32, 32)
    out = run_onnx(session, x)
    assert out[0].dtype == np.float16
    assert check_metrics(output_metrics(out, [_torch_out(model, x)]), "fp16")[0]


# -------------------------------------------------------------------------------------------------------- int8
def test_int8_qdq_per_channel_symmetric(tiny):
    model, proto = tiny
    images = calibration_images("digits", 32, 32)
    q = quantize_int8(proto, images, batch_size=8)
    assert onnx_precision(q) == "int8"
    onnx.checker.check_model(q)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert not ops & {"QLinearConv", "ConvInteger", "MatMulInteger"}  # explicit Q/DQ, not operator-oriented
    inits = {t.name: t for t in q.graph.initializer}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in q.graph.node for o in n.output}
    for conv in convs:
        dq = producers[conv.input[1]]  # the weight comes through a DequantizeLinear
        assert dq.op_type == "DequantizeLinear"
        weight, scale, zero = (inits[name] for name in dq.input)
        assert weight.data_type == TensorProto.INT8 and zero.data_type == TensorProto.INT8
        assert list(scale.dims) == [weight.dims[0]]  # one scale per output channel
        assert not numpy_helper.to_array(zero).any()  # symmetric
        if len(conv.input) > 2:  # bias stays float: TensorRT rejects int32 DequantizeLinear
            assert conv.input[2] in inits and inits[conv.input[2]].data_type == TensorProto.FLOAT
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear":
            zero = inits[node.input[2]]
            assert zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any()
    x = torch.as_tensor(calibration_images("digits", 32, 32 + MIN_HELD_OUT)[32:])  # held out: not calibrated on
    cand = run_onnx(onnx_session(q), x)
    _assert_int8_floors(cand, _torch_out(model, x))
    assert output_metrics(cand, [_torch_out(model, x)])["max_rel"] > 1e-3  # really quantized


def test_int8_fixed_batch_model(tiny):
    model, _ = tiny
    fixed = export_onnx(model, 32, batch=4, dynamic_batch=False)
    q = quantize_int8(fixed, calibration_images("digits", 32, 10))  # 8 of the 10 images, in batches of 4
    session = onnx_session(q, exact_qdq=True)
    x = torch.as_tensor(calibration_images("digits", 32, 10 + MIN_HELD_OUT)[10:])  # held out, in batches of 4
    cand = np.concatenate([run_onnx(session, b)[0] for b in x.split(4)])
    _assert_int8_floors([cand], _torch_out(model, x))
    with pytest.raises(PrecisionError, match="fixed batch of 4"):
        quantize_int8(fixed, calibration_images("digits", 32, 3))


def test_int8_rejects_bad_input(tiny):
    _, proto = tiny
    with pytest.raises(PrecisionError, match="no calibration images"):
        quantize_int8(proto, np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(PrecisionError, match="unknown calibration method"):
        quantize_int8(proto, np.zeros((2, 3, 32, 32), np.float32), method="kl")


# ------------------------------------------------------------------------------------------- calibration data
def test_digits_calibration_images():
    images = calibration_images("digits", 40, 12, channels=3)
    assert images.shape == (12, 3, 40, 40) and images.dtype == np.float32
    assert np.array_equal(images[:, 0], images[:, 2])  # grey replicated
    with pytest.raises(PrecisionError, match="at least 1"):
        calibration_images("digits", 40, 0)


def _png(path, size, color, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_images_preprocessing(tmp_path):
    _png(tmp_path / "cat" / "a.png", (50, 40), (255, 255, 255))
    _png(tmp_path / "dog" / "b.PNG", (30, 70), (0, 0, 0))
    _png(tmp_path / "dog" / "deep" / "c.png", (64, 64), 128, mode="L")
    _png(tmp_path / "rgba.png", (20, 20), (255, 0, 0, 0), mode="RGBA")
    (tmp_path / "notes.txt").write_text("not an image")
    images = folder_images(tmp_path, 16)
    assert images.shape == (4, 3, 16, 16)
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    # sorted paths: cat/a.png (white), dog/b.PNG (black), dog/deep/c.png (grey 128), rgba.png (red)
    np.testing.assert_allclose(images[0], np.broadcast_to((1 - mean) / std, (3, 16, 16)), atol=1e-5)
    np.testing.assert_allclose(images[1], np.broadcast_to(-mean / std, (3, 16, 16)), atol=1e-5)
    np.testing.assert_allclose(images[2], np.broadcast_to((128 / 255 - mean) / std, (3, 16, 16)), atol=1e-5)
    assert images[3, 0].min() > images[3, 1].max()  # red channel brightest
    assert folder_images(tmp_path, 16, samples=2).shape == (2, 3, 16, 16)
    assert folder_images(tmp_path, 16, channels=1).shape == (4, 1, 16, 16)


def test_folder_images_errors(tmp_path):
    with pytest.raises(PrecisionError, match="not a directory"):
        folder_images(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrecisionError, match="no images"):
        folder_images(tmp_path / "empty", 16)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(PrecisionError, match="broken.png: not a readable image"):
        folder_images(bad, 16)


def test_fp16_range_check_catches_what_onnxruntime_cpu_hides(tiny):
    """onnxruntime CPU runs fp16 Conv through fp32 kernels, so activations beyond 65504 only show up in the model."""
    model, _ = tiny
    x = [torch.randn(2, 3, 32, 32)]
    peak = max_activation(model, x)
    assert 0 < peak < 65504
    ref = np.ones((2, 10))
    m = dict(output_metrics([ref], [ref]), max_activation=peak)
    assert check_metrics(m, "fp16")[0]
    m["max_activation"] = 1e5
    passed, reason = check_metrics(m, "fp16")
    assert not passed and "beyond fp16's range" in reason
    assert check_metrics(m, "fp32")[0]  # fp32 does not care
