"""The int8 path: TensorRT Q/DQ placement, calibration sources, and an int8 check that fails when it should.

One tiny RepVGG trained for about a second on digits (16x16) serves every test; broken int8 models are made from
its correct export (one scale multiplied by 100, calibration on the wrong distribution).
"""

import json
import os
import subprocess
import sys

import numpy as np
import onnx  # noqa: F401  (declared in .[all]: a broken install fails loudly)
import onnxruntime  # noqa: F401  (declared in .[all]: a broken install fails loudly)
import pytest
import torch
from convert_helpers import EXPORT_TINY as TINY
from onnx import TensorProto, numpy_helper  # noqa: E402
from torch import nn

from repvgg_tools import randomize_batchnorm, reparameterize, save_checkpoint  # noqa: E402
from repvgg_tools.data import digits_dataset  # noqa: E402
from repvgg_tools.export.calibration import folder_images  # noqa: E402
from repvgg_tools.export.int8 import (  # noqa: E402
    CalibrationSource,
    Int8Floors,
    export_int8,
    int8_metrics,
    is_digits_model,
    verify_int8,
)
from repvgg_tools.export.onnx import export_onnx, onnx_session, op_counts, run_onnx  # noqa: E402
from repvgg_tools.export.precision import PrecisionError  # noqa: E402
from repvgg_tools.export.qdq import calibration_tensors, check_tensorrt_qdq  # noqa: E402
from repvgg_tools.models import RepVGG  # noqa: E402

SIZE = 16  # digits are 8x8; 16x16 keeps training to about a second


def run_cli(*args, prelude=""):
    """``repvgg-export`` in a fresh process; ``prelude`` runs first (fault injection for the broken-model test)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = f"import sys\n{prelude}\nfrom repvgg_tools.cli.export import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def run_main(capsys, *args):
    """``repvgg-export``'s ``main`` in this process (the same code, without a second interpreter start)."""
    from repvgg_tools.cli.export import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, captured.out, captured.err)


def assert_one_line_error(proc, rc, fragment):
    assert proc.returncode == rc, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A tiny RepVGG trained on digits: (training checkpoint path, deploy model, fp32 ONNX, PyTorch val accuracy)."""
    torch.manual_seed(0)
    model = RepVGG(**TINY)
    images, labels = digits_dataset("train", image_size=SIZE).tensors
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _epoch in range(3):
        for idx in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    val_x, val_y = digits_dataset("val", image_size=SIZE).tensors
    with torch.no_grad():
        acc = (model(val_x).argmax(1) == val_y).float().mean().item()
    path = tmp_path_factory.mktemp("digits") / "digits_train.pth"
    save_checkpoint({"state_dict": model.state_dict(), "num_classes": 10}, path)
    deploy = reparameterize(model).eval()
    return path, deploy, export_onnx(deploy, SIZE), acc


@pytest.fixture(scope="module")
def source():
    return CalibrationSource.digits(SIZE, calib_samples=64, verify_samples=128)


@pytest.fixture(scope="module")
def correct(digits, source):
    _, deploy, proto, _ = digits
    return export_int8(deploy, proto, source)


def _scaled(proto, name, factor):
    """A copy of ``proto`` with initializer ``name`` multiplied by ``factor``."""
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    for init in broken.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), name))
            return broken
    raise KeyError(name)


def _act_scale(proto, conv_index):
    """Name of the activation scale at the input of the ``conv_index``-th Conv."""
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    producer = {o: n for n in proto.graph.node for o in n.output}
    return producer[convs[conv_index].input[0]].input[1]


# ------------------------------------------------------------------------------------------------ Q/DQ placement
def test_tensorrt_placement_on_our_export(correct, digits):
    q, report = correct
    assert check_tensorrt_qdq(q) == [] and report.placement_problems == []
    ops = op_counts(q)
    acts = calibration_tensors(digits[2])
    assert len(acts) == ops["Conv"] + ops["Gemm"] == 8  # every layer reads a distinct activation here
    assert ops["QuantizeLinear"] == 8 and ops["DequantizeLinear"] == 16  # 8 activations + 8 weights
    producer = {o: n for n in q.graph.node for o in n.output}
    consumers = {}
    for n in q.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inits = {i.name: i for i in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producer[node.input[0]]
            assert dq.op_type == "DequantizeLinear" and producer[dq.input[0]].op_type == "QuantizeLinear"
            assert numpy_helper.to_array(inits[dq.input[1]]).size == 1  # per tensor
            wdq = producer[node.input[1]]
            w, scale = inits[wdq.input[0]], numpy_helper.to_array(inits[wdq.input[1]])
            assert w.data_type == TensorProto.INT8 and scale.shape == (w.dims[0],)  # per output channel
            assert {a.name: a.i for a in wdq.attribute}["axis"] == 0
            assert not numpy_helper.to_array(inits[wdq.input[2]]).any()  # symmetric
            assert inits[node.input[2]].data_type == TensorProto.FLOAT  # float bias
            assert all(c.op_type != "QuantizeLinear" for c in consumers.get(node.output[0], []))  # fusable
    assert producer["logits"].op_type == "Gemm"  # the logits leave in float
    for method in ("entropy", "percentile"):
        q2, _ = export_int8(digits[1], digits[2], CalibrationSource.digits(SIZE, verify_samples=64), method=method,
                            verify=False)
        assert check_tensorrt_qdq(q2) == []


def test_placement_checker_finds_broken_graphs(correct, digits, tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    q, _ = correct
    # onnxruntime's default QDQ placement: Q/DQ on every Conv output, on Relu/pool outputs and on the logits
    fp32_path, ort_path = tmp_path / "fp32.onnx", tmp_path / "ort.onnx"
    onnx.save(digits[2], fp32_path)
    batches = iter([{"input": np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)}])

    class Reader:
        def get_next(self):
            return next(batches, None)

    quantize_static(str(fp32_path), str(ort_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    problems = "\n".join(check_tensorrt_qdq(onnx.load(ort_path)))
    for fragment in ("graph output 'logits' leaves through DequantizeLinear", "stray Q/DQ", "blocks Conv+bias+ReLU",
                     "not quantized per output channel", "not int8", "not a float initializer"):
        assert fragment in problems, problems
    # hand-broken copies of our correct graph, one fault each
    producer = {o: n for n in q.graph.node for o in n.output}
    conv = next(n for n in q.graph.node if n.op_type == "Conv")
    unquantized = onnx.ModelProto()
    unquantized.CopyFrom(q)
    first = next(n for n in unquantized.graph.node if n.op_type == "Conv")
    first.input[0] = producer[producer[conv.input[0]].input[0]].input[0]  # bypass the input Q/DQ
    assert any("is not quantized" in p for p in check_tensorrt_qdq(unquantized))
    zero_name = producer[conv.input[0]].input[2]
    asym = onnx.ModelProto()
    asym.CopyFrom(q)
    for init in asym.graph.initializer:
        if init.name == zero_name:
            init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), zero_name))
    assert any("asymmetric" in p for p in check_tensorrt_qdq(asym))
    assert any("not positive" in p for p in check_tensorrt_qdq(_scaled(q, _act_scale(q, 2), -1.0)))
    per_tensor = onnx.ModelProto()
    per_tensor.CopyFrom(q)
    wscale = producer[conv.input[1]].input[1]
    for init in per_tensor.graph.initializer:
        if init.name == wscale:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[:1], wscale))
    assert any("not quantized per output channel" in p for p in check_tensorrt_qdq(per_tensor))


# ------------------------------------------------------------------------------------------- calibration sources
def test_held_out_never_overlaps_calibration(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 255, (12, 12, 3), dtype=np.uint8) for _ in range(90)]
    for i, p in enumerate(pixels):
        (tmp_path / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(p).save(tmp_path / f"c{i % 3}" / f"{i:03d}.png")
    for i in range(6):  # copies of images under other names: equal content must never land on both sides
        Image.fromarray(pixels[i]).save(tmp_path / "c0" / f"copy{i}.png")
    src = CalibrationSource.folder(tmp_path, 8, calib_samples=20, verify_samples=100)
    assert len(src.calibration) == 20 and len(src.calibration) + len(src.held_out) <= 96
    calib = {img.tobytes() for img in src.calibration}
    assert not any(img.tobytes() in calib for img in src.held_out)
    assert np.array_equal(CalibrationSource.folder(tmp_path, 8, calib_samples=20).calibration, src.calibration)
    classes = {img.tobytes(): c for c in ("c0", "c1", "c2") for img in folder_images(tmp_path / c, 8)}
    assert len({classes[img.tobytes()] for img in src.calibration}) == 3  # shuffled: sorted order would take c0
    with pytest.raises(PrecisionError, match="leave 6 for the int8 check, at least 64 needed.*--calib-samples"):
        CalibrationSource.folder(tmp_path, 8, calib_samples=90)
    digits = CalibrationSource.digits(8, calib_samples=64, verify_samples=128)
    assert digits.held_out_labels is not None and len(digits.held_out) == 128
    assert not {i.tobytes() for i in digits.calibration} & {i.tobytes() for i in digits.held_out}
    x = np.random.default_rng(1).standard_normal((70, 3, 8, 8), dtype=np.float32)
    with pytest.raises(PrecisionError, match="overlap"):
        CalibrationSource("mine", x[:10], x[5:])
    dropped = CalibrationSource.from_arrays("mine", x[:10], x[:70], min_held_out=0)  # shared images leave held-out
    assert len(dropped.held_out) == 60 and np.array_equal(dropped.held_out, x[10:70])


def test_too_few_held_out_is_a_clear_error():
    x = np.random.default_rng(1).standard_normal((80, 3, 8, 8), dtype=np.float32)
    src = CalibrationSource.from_arrays("mine", x[:10], x[:80], min_held_out=64)
    assert len(src.held_out) == 70
    with pytest.raises(PrecisionError, match="only 60 held-out images.*at least 64"):
        CalibrationSource.from_arrays("mine", x[:20], x[:80])
    with pytest.raises(PrecisionError, match="must be in"):
        Int8Floors(min_top1=1.5)


def test_is_digits_model():
    assert is_digits_model(RepVGG(**TINY), 16)
    assert not is_digits_model(RepVGG(**dict(TINY, num_classes=1000)), 16)
    assert not is_digits_model(RepVGG(**dict(TINY, in_chans=4)), 16)


# ------------------------------------------------------------------------------------------------ the int8 check
def test_check_passes_on_correct_export(correct, digits):
    _, report = correct
    m = report.metrics
    print(f"\ncorrect int8: {report.summary()}; accuracy {report.accuracy}")
    assert report.passed and report.failures == [] and report.held_out_samples == 128
    assert report.calibration_samples == 64 and report.source == "digits" and not report.synthetic
    assert m["top1_agreement"] >= 0.97 and m["cosine_mean"] >= 0.998 and m["rel_error"] < 0.1
    assert m["max_rel"] > 1e-3  # really quantized
    assert report.accuracy["fp32"] > 0.85 and report.accuracy["int8"] >= report.accuracy["fp32"] - 0.02
    d = report.to_dict()
    assert d["passed"] and d["floors"] == {"min_top1": 0.95, "min_cosine": 0.99, "min_feature_cosine": 0.97,
                                           "max_rel_error": 0.3}
    json.dumps(d)


def test_check_fails_when_one_scale_is_multiplied_by_100(correct, digits, source):
    q, _ = correct
    deploy, held_out = digits[1], source.held_out[:64]
    for conv in (0, 3):
        metrics, failures, _, _ = verify_int8(_scaled(q, _act_scale(q, conv), 100), deploy, held_out)
        print(f"\nactivation scale x100 at conv {conv}: {metrics['top1_agreement']:.3f}, "
              f"{metrics['cosine_mean']:.4f}")
        assert any("top-1 agreement" in f for f in failures) and any("cosine" in f for f in failures)
    # the classifier's weight scales x100: top-1 and cosine cannot see a scaled output, the relative error does
    metrics, failures, _, _ = verify_int8(_scaled(q, "head.fc.weight_scale", 100), deploy, held_out)
    assert metrics["top1_agreement"] >= 0.95 and metrics["cosine_mean"] >= 0.99
    assert failures == [f"relative error {metrics['rel_error']:.3g} > 0.3"] and metrics["rel_error"] > 50
    assert verify_int8(q, deploy, held_out)[1] == []  # the unbroken model passes the same check


def test_check_fails_when_calibrated_on_the_wrong_distribution(digits, source):
    """Calibrated on uniform noise in [0, 1] or on digits 100x too dark, checked on real digits: it fails."""
    _, deploy, proto, _ = digits
    rng = np.random.default_rng(0)
    for name, calib in (("uniform noise", rng.random((64, 3, SIZE, SIZE), dtype=np.float32)),
                        ("dark digits", source.calibration * 0.01)):
        wrong = CalibrationSource.from_arrays(name, calib, source.held_out, source.held_out_labels)
        _, report = export_int8(deploy, proto, wrong)
        print(f"\ncalibrated on {name}: {report.summary()}")
        assert not report.passed and any("cosine" in f for f in report.failures)


def test_metrics_per_feature_map():
    rng = np.random.default_rng(0)
    refs = [np.abs(rng.normal(size=(5, 4, 3, 3))), np.abs(rng.normal(size=(5, 8, 2, 2)))]
    m = int8_metrics([r.copy() for r in refs], refs)
    assert not m["classifier"] and m["feature_cosine"] == pytest.approx([1, 1]) and m["feature_rel_error"] == [0, 0]
    cands = [refs[0].copy(), refs[1] * 3]
    m = int8_metrics(cands, refs)
    assert m["feature_cosine"][1] == pytest.approx(1) and m["feature_rel_error"][1] == pytest.approx(2)
    from repvgg_tools.export.int8 import _failures

    assert _failures(m, Int8Floors()) == ["output 1 relative error 2 > 0.3"]


# ----------------------------------------------------------------------------------------------------- the CLI
def test_cli_int8_digits_default_and_figures(digits, tmp_path, capsys):
    ckpt, _, _, torch_acc = digits
    out, report_path = tmp_path / "int8.onnx", tmp_path / "int8.json"
    proc = run_main(capsys, ckpt, out, "--input-size", SIZE, "--precision", "int8", "--json", report_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for fragment in ("top-1 agreement", "(floor 95.00%)", "logit cosine mean", "relative error",
                     "onnxruntime, all graph optimizations", "held-out accuracy", "int8 check: ok"):
        assert fragment in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["calibration"] == {"source": "digits", "samples": 64, "method": "minmax", "reduce_range": False,
                                     "synthetic": False}
    v = report["verification"]
    assert v["passed"] and v["held_out_samples"] == 128 and v["accuracy"]["fp32"] > 0.85
    assert check_tensorrt_qdq(onnx.load(out)) == []
    assert run_onnx(onnx_session(out, exact_qdq=True), torch.randn(7, 3, SIZE, SIZE))[0].shape == (7, 10)


def test_cli_int8_floor_flags(digits, tmp_path, capsys):
    ckpt = digits[0]
    # entropy calibration clips the digits input too hard: it fails the default floors, passes lowered ones
    entropy = run_main(capsys, ckpt, tmp_path / "e.onnx", "--input-size", SIZE, "--precision", "int8",
                       "--calib-method", "entropy")
    assert_one_line_error(entropy, 1, "below the floors")
    assert "(floor 0.99)" in entropy.stdout and not (tmp_path / "e.onnx").exists()
    lenient = run_main(capsys, ckpt, tmp_path / "e.onnx", "--input-size", SIZE, "--precision", "int8",
                       "--calib-method", "entropy", "--int8-min-top1", 0.8, "--int8-min-cosine", 0.9)
    assert lenient.returncode == 0 and "(floor 80.00%)" in lenient.stdout, lenient.stdout + lenient.stderr
    assert (tmp_path / "e.onnx").exists()


@pytest.mark.slow
def test_cli_int8_broken_scale_exit_1(digits, tmp_path):
    """A real repvgg-export process whose quantizer writes one activation scale 100x too large: exit 1, no file."""
    ckpt = digits[0]
    prelude = (
        "import numpy as np\nfrom onnx import numpy_helper\nimport repvgg_tools.export.int8 as p\n"
        "_orig = p.quantize_int8\n"
        "def broken(*a, **k):\n"
        "    q = _orig(*a, **k)\n"
        "    init = next(i for i in q.graph.initializer if i.name.endswith('Relu_output_0_scale'))\n"
        "    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(100), init.name))\n"
        "    return q\n"
        "p.quantize_int8 = broken\n")
    out = tmp_path / "broken.onnx"
    proc = run_cli(ckpt, out, "--input-size", SIZE, "--precision", "int8", "--json", tmp_path / "r.json",
                   prelude=prelude)
    assert_one_line_error(proc, 1, "below the floors")
    assert "int8 check: FAILED" in proc.stdout and not out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["written"] and not report["verification"]["passed"]


def test_cli_int8_needs_calib_dir_for_other_models(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize_batchnorm(RepVGG(**dict(TINY, num_classes=1000)), seed=2).eval()
    ckpt, out = tmp_path / "imagenet_like.pth", tmp_path / "q.onnx"
    save_checkpoint({"state_dict": model.state_dict(), "num_classes": 1000}, ckpt)
    proc = run_main(capsys, ckpt, out, "--input-size", SIZE, "--precision", "int8")
    assert_one_line_error(proc, 2, "--calib-dir")
    assert "--calib synthetic" in proc.stderr and not out.exists()
    proc = run_main(capsys, ckpt, out, "--input-size", SIZE, "--precision", "int8", "--calib", "synthetic",
                    "--json", tmp_path / "s.json")
    assert "synthetic calibration: a smoke test" in proc.stdout, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["calibration"]["synthetic"] and "says nothing about accuracy" in report["verification"]["summary"]
    out2 = tmp_path / "q2.onnx"
    assert_one_line_error(run_main(capsys, ckpt, out2, "--input-size", SIZE, "--int8-min-top1", 0.9), 2,
                          "need --precision int8")
    assert_one_line_error(run_main(capsys, ckpt, out2, "--input-size", SIZE, "--precision", "int8", "--calib",
                                   "synthetic", "--int8-min-cosine", 2), 2, "cosine floor")
    assert not out2.exists()


def test_cli_int8_calib_dir(digits, tmp_path, capsys):
    """Digits saved as PNG files, used through --calib-dir: split, calibrated, checked on the files held out."""
    from PIL import Image

    ckpt = digits[0]
    images, labels = digits_dataset("all", image_size=8, channels=1).tensors
    for i in range(100):
        pixels = ((images[i, 0] - images.min()) / (images.max() - images.min()) * 255).byte().numpy()
        (tmp_path / "imgs" / str(int(labels[i]))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "imgs" / str(int(labels[i])) / f"{i}.png")
    out, report_path = tmp_path / "q.onnx", tmp_path / "q.json"
    proc = run_main(capsys, ckpt, out, "--input-size", SIZE, "--precision", "int8", "--calib-dir",
                    tmp_path / "imgs", "--calib-samples", 32, "--json", report_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["calibration"]["samples"] == 32 and report["calibration"]["source"].endswith("imgs")
    assert report["verification"]["held_out_samples"] == 68 and report["verification"]["accuracy"] is None
    proc = run_main(capsys, ckpt, tmp_path / "q2.onnx", "--input-size", SIZE, "--precision", "int8",
                    "--calib-dir", tmp_path / "imgs")
    assert_one_line_error(proc, 2, "at least 64 needed")
    proc = run_main(capsys, ckpt, tmp_path / "q2.onnx", "--precision", "int8", "--calib-dir", tmp_path / "nothing")
    assert_one_line_error(proc, 2, "not a directory")
    assert not (tmp_path / "q2.onnx").exists()


def test_cli_int8_features_per_map(digits, tmp_path, capsys):
    ckpt = digits[0]
    report_path = tmp_path / "f.json"
    proc = run_main(capsys, ckpt, tmp_path / "f.onnx", "--input-size", 32, "--precision", "int8", "--features",
                    "--out-indices", 2, 4, "--json", report_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "output 1: cosine mean" in proc.stdout and "(floor 0.97)" in proc.stdout
    v = json.loads(report_path.read_text())["verification"]
    assert len(v["metrics"]["feature_cosine"]) == 2 and min(v["metrics"]["feature_cosine"]) >= 0.97
    model = onnx.load(tmp_path / "f.onnx")
    assert check_tensorrt_qdq(model) == [] and [o.name for o in model.graph.output] == ["feat0", "feat1"]


def test_cli_int8_reduce_range(digits, tmp_path, capsys):
    """7-bit weights (for int8 kernels that saturate at full range) keep the accuracy."""
    report_path = tmp_path / "rr.json"
    proc = run_main(capsys, digits[0], tmp_path / "rr.onnx", "--input-size", SIZE, "--precision", "int8",
                    "--reduce-range", "--json", report_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    acc = report["verification"]["accuracy"]
    assert report["calibration"]["reduce_range"] and "7-bit weights" in proc.stdout
    assert acc["onnxruntime_optimized"] >= acc["fp32"] - 0.03 and acc["int8"] >= acc["fp32"] - 0.03
    q = onnx.load(tmp_path / "rr.onnx")
    weights = [numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("weight_quantized")]
    assert max(int(np.abs(w).max()) for w in weights) == 63


# ------------------------------------------------------------------------------------ quantization-aware training
def test_qat_on_digits_int8_within_half_a_point_of_fp32(digits, tmp_path, capsys):
    """Fuse, fake-quantize (scales from PTQ calibration), fine-tune, save; repvgg-export writes the learned scales
    unchanged and the int8 file keeps the fp32 accuracy on the whole digits validation split."""
    from repvgg_tools.training.qat import is_qat, prepare_qat, qat_state

    ckpt, deploy, _, fp32_acc = digits
    images, labels = digits_dataset("train", image_size=SIZE).tensors
    training_form = RepVGG(**TINY)
    training_form.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    qat = prepare_qat(training_form, [images[:64]])  # fuse first, then fake-quantize
    assert is_qat(qat) and not any(isinstance(m, nn.BatchNorm2d) for m in qat.modules())
    opt = torch.optim.Adam(qat.parameters(), lr=1e-4)
    qat.train()
    for idx in torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).split(64):
        loss = nn.functional.cross_entropy(qat(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state, quant = qat_state(qat.eval())
    assert set(state) == set(deploy.state_dict())  # plain deploy keys: every loader reads them
    path, out, report_path = tmp_path / "qat.pth", tmp_path / "qat.onnx", tmp_path / "qat.json"
    save_checkpoint({"state_dict": state, "quant": quant, "num_classes": 10}, path)
    proc = run_main(capsys, path, out, "--input-size", SIZE, "--precision", "int8", "--verify-samples", 400,
                    "--json", report_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scales: from quantization-aware training (no calibration)" in proc.stdout
    report = json.loads(report_path.read_text())
    assert report["calibration"]["method"] == "qat" and report["calibration"]["samples"] == 0
    acc = report["verification"]["accuracy"]
    print(f"\nQAT: fp32 before {fp32_acc:.4f}, QAT weights fp32 {acc['fp32']:.4f}, int8 {acc['int8']:.4f} "
          f"({report['verification']['held_out_samples']} images)")
    assert report["verification"]["held_out_samples"] == len(digits_dataset("val", image_size=SIZE))
    assert acc["int8"] >= fp32_acc - 0.005 and acc["int8"] >= acc["fp32"] - 0.005
    q = onnx.load(out)  # the trained scales, as they are
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for layer, scale in quant["weight_scales"].items():
        np.testing.assert_array_equal(inits[f"{layer}.weight_scale"], scale.numpy())
    assert float(inits["input_scale"]) == pytest.approx(float(quant["activation_scales"]["stem.reparam"]), rel=1e-6)
    assert check_tensorrt_qdq(q) == []
    with torch.no_grad():  # the ONNX Q/DQ graph computes what the fake-quantized model computes
        fake = qat(images[:32]).numpy()
    got = run_onnx(onnx_session(out, exact_qdq=True), images[:32])[0]
    assert np.abs(got - fake).max() <= 0.05 * np.abs(fake).max()
