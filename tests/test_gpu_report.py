"""tools/gpu_report.py on the CPU: a tiny real run writes a complete report whose equivalence figures meet the contract;
a tiny budget drops rows and lists them; missing optional packages disable only their rows; the budget planner and
the equivalence check fail when handed a wrong answer. No timing assertions."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repvgg_tools.bench.budget import Setup, Task, TimeBudget

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_report.py"  # the shim the GPU machine runs from a plain checkout
MODULE = "repvgg_tools.cli.gpu_report"
CHECKOUT_ENV = dict(os.environ, PYTHONPATH=str(ROOT))
TINY = ["--device", "cpu", "--size", "32", "--batch", "2", "--iters", "1", "--warmup", "0", "--eq-batch", "2"]


@pytest.fixture
def tool():
    """The tool's namespace, loaded afresh in this process (its budget clock starts at the load; the torch flags its
    main() sets are restored afterwards)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield runpy.run_module(MODULE, run_name="gpu_report")
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.slow
def test_cpu_report_is_complete_and_within_contract(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(TOOL), *TINY, "--models", "repvgg_a0", "resnet18", "--trt-models",
                           "repvgg_a0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=CHECKOUT_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["device"] == "cpu"
    assert report["budget"]["dropped"] == [] and report["failures"] == [] and report["unavailable"] == {}
    for name in ("repvgg_a0", "resnet18"):
        for form in ("training", "deploy"):
            for prec in ("fp32", "fp16"):
                row = report["throughput"][name][form][prec]
                assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
        e = report["equivalence"][name]
        assert e["samples"] == 2 and e["passed"]
        assert e["fp32_max_rel"] <= 1e-5 and e["fp64_max_rel"] <= 1e-12
        assert e["fp16_dtype"] == "float16" and e["fp16_cosine"] >= 0.9999 and e["fp16_top1_agreement"] >= 0.99
        r = report["ratios"][name]
        tp = report["throughput"][name]
        assert r["deploy_vs_training_fp32"] == pytest.approx(tp["deploy"]["fp32"]["images_per_s"]
                                                             / tp["training"]["fp32"]["images_per_s"])
        assert r["vs_resnet18_fp16"] == pytest.approx(tp["deploy"]["fp16"]["images_per_s"] /
                                                      report["throughput"]["resnet18"]["training"]["fp16"]
                                                      ["images_per_s"])
    assert report["ratios"]["repvgg_a0"]["paper_vs_resnet18"] == pytest.approx(3256 / 2442)
    assert report["models"]["repvgg_a0"]["params"] == {"training": 9_108_968, "deploy": 8_309_384}
    assert report["models"]["resnet18"]["params"]["training"] == 11_689_512
    assert report["onnx"]["repvgg_a0"]["passed"] and report["onnx"]["repvgg_a0"]["max_rel"] <= 1e-4
    assert report["tensorrt"]["skipped"].startswith("no CUDA device")
    text = (out / "report.md").read_text()
    for heading in ("## Throughput", "## Equivalence on the device", "## ONNX export", "## TensorRT", "## Plot"):
        assert heading in text
    assert "| repvgg_a0 | 3256 |" in text and "| resnet18 | 2442 |" in text and "FAILED" not in text
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_tiny_budget_drops_rows_and_lists_them(tool, tmp_path, capsys):
    out = tmp_path / "r"
    assert tool["main"]([*TINY, "--models", "repvgg_a0", "resnet18", "--trt-models", "repvgg_a0", "--budget-s",
                         "0.001", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    dropped = {d["key"] for d in report["budget"]["dropped"]}
    planned = {f"{n} {f} {p}" for n in ("repvgg_a0", "resnet18") for f in ("training", "deploy")
               for p in ("fp32", "fp16")} | {"repvgg_a0 equivalence", "resnet18 equivalence",
                                              "repvgg_a0 ONNX export + onnxruntime"}
    assert dropped == planned and report["budget"]["done"] == []
    assert report["throughput"]["resnet18"]["deploy"]["fp16"]["dropped"].startswith("no time left")
    text = (out / "report.md").read_text()
    assert "## Dropped to fit the budget" in text
    assert all(f"| {key} |" in text for key in planned)
    # an existing report is not overwritten without --force
    assert tool["main"]([*TINY, "--models", "repvgg_a0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("report.md: already exists (use --force to overwrite)")


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet34"], "error: unknown model(s) resnet34"),
    (["--batch", "0"], "error: --batch must be at least 1, not 0"),
    (["--budget-s", "0"], "error: --budget-s must be positive, not 0"),
    (["--trt-models", "resnet18"], "error: --trt-models takes our models, not resnet18"),
])
def test_bad_arguments_fail_in_one_line(tool, tmp_path, capsys, argv, message):
    assert tool["main"](["--out", str(tmp_path / "r"), *argv]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "r").exists()


POISON = """
import runpy, sys
for name in ("torchvision", "onnx", "onnxruntime", "onnxslim", "onnxconverter_common", "matplotlib", "timm",
             "tensorrt", "tensorrt_rtx", "sklearn", "safetensors", "yaml", "tqdm", "scipy"):
    sys.modules[name] = None  # import raises ImportError, as on a machine without the package
tool = runpy.run_module(sys.argv[1], run_name="gpu_report")
try:
    tool["main"](["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("HELP-OK", flush=True)
sys.exit(tool["main"](sys.argv[2:]))
"""


def test_missing_optional_packages_disable_only_their_rows(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-c", POISON, MODULE, *TINY, "--models", "repvgg_a0", "resnet18",
                           "--trt-models", "repvgg_a0", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: repvgg-gpu-report" in proc.stdout and "HELP-OK" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["unavailable"] == {"resnet18": report["unavailable"]["resnet18"]}
    assert report["unavailable"]["resnet18"].startswith("torchvision is not importable")
    assert report["onnx"]["skipped"].startswith("onnx is not importable")
    assert "onnx is not importable" in report["tensorrt"]["skipped"]
    assert report["plot"]["skipped"].startswith("matplotlib is not importable") and not (out / "report.png").exists()
    # everything that needs only torch still ran
    assert report["equivalence"]["repvgg_a0"]["passed"] and report["budget"]["dropped"] == []
    assert all(report["throughput"]["repvgg_a0"][f][p]["images_per_s"] > 0 for f in ("training", "deploy")
               for p in ("fp32", "fp16"))
    assert set(report["throughput"]) == {"repvgg_a0"} and report["ratios"]["repvgg_a0"]["vs_resnet18_fp32"] is None
    text = (out / "report.md").read_text()
    assert "PNG skipped: matplotlib is not importable" in text and "- resnet18: torchvision is not importable" in text


def test_equivalence_check_fails_on_a_wrong_deploy_model():
    from repvgg_tools.bench.device_checks import equivalence, prepare

    models = prepare("repvgg_a0", "cpu")
    assert equivalence(models, torch.device("cpu"), 2, 32)["passed"]
    with torch.no_grad():
        conv = models["deploy"].stages[0][0].reparam
        conv.weight.mul_(1 + 0.05 * torch.randn_like(conv.weight))  # a fusion bug's worth of error
    e = equivalence(models, torch.device("cpu"), 2, 32)
    assert not e["passed"] and not e["fp32_passed"] and e["fp32_max_rel"] > 1e-3
    # the float64 check reports on this deploy model too: its weights are not the float64 fusion rounded once
    assert not e["fp64_passed"] and e["fp64_not_rounded_once"] == ["stages.0.0.reparam.weight"]
    assert e["fp64_max_rel"] <= 1e-12  # the fusion code itself is still exact


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _work(clock: FakeClock, seconds: float):
    def fn(*_):
        clock.t += seconds
        return seconds
    return fn


def _never(*_):
    raise AssertionError("a task that does not fit must not run")


def test_budget_estimates_from_measured_rates_and_drops_what_would_overrun():
    clock = FakeClock()
    budget = TimeBudget(12.0, clock=clock, reserve_s=2.0)
    first = Task("first", "speed fp32", work=2, fn=_work(clock, 1.0))
    assert budget.estimate(first) is None and budget.run(first) == (True, 1.0)  # nothing known: runs, measured
    big = Task("big", "speed fp32", work=20, fn=_never)
    assert budget.estimate(big) == pytest.approx(10.0)  # 0.5 s per unit of work, measured
    ran, reason = budget.run(big)
    assert not ran and reason == "estimated 10.0 s, 9.0 s left"
    assert budget.run(Task("fits", "speed fp32", work=8, fn=_work(clock, 5.0)))[0]  # 4 s estimated, 5 s taken
    assert budget.estimate(Task("x", "speed fp32", work=1, fn=_never)) == pytest.approx(5 / 8)  # latest rate wins
    # an unmeasured group borrows the slowest measured rate of its kind, else of any kind; a prior wins over both
    assert budget.run(Task("check", "check small", work=1, fn=_work(clock, 1.0)))[0]  # 1 s per unit: slowest
    assert budget.estimate(Task("half", "speed fp16", work=4, fn=_never)) == pytest.approx(4 * 5 / 8)
    assert budget.estimate(Task("other", "engine fp16", work=2, fn=_never)) == pytest.approx(2.0)
    assert not budget.run(Task("engine", "engine fp32", work=1, fn=_never, prior_s=30.0))[0]
    clock.t += 10
    ran, reason = budget.run(Task("late", "speed fp32", work=0.001, fn=_never))
    assert not ran and reason.startswith("no time left")
    assert [d["key"] for d in budget.dropped] == ["big", "engine", "late"]
    assert [d["key"] for d in budget.done] == ["first", "fits", "check"]


def test_budget_setups_run_once_are_estimated_and_failures_propagate():
    clock = FakeClock()
    budget = TimeBudget(100.0, clock=clock)
    built = []
    setup = Setup("build m", work=10, fn=lambda: (built.append(1), _work(clock, 5.0)(), "model")[2])
    assert budget.run(Task("a", "g", work=1, fn=lambda m: m + "!", setup=setup)) == (True, "model!")
    assert budget.run(Task("b", "g", work=1, fn=lambda m: m, setup=setup)) == (True, "model")
    assert built == [1] and budget.setups[0]["seconds"] == 5.0
    other = Setup("build n", work=30, fn=_never)
    assert budget.estimate(Task("c", "g", work=1, fn=_never, setup=other)) == pytest.approx(15.0)  # 0.5 s/param
    assert budget.estimate(Task("c", "g", work=1000, fn=_never)) == 0.0  # task rates never borrow setup rates
    budget.release(["build m"])
    assert budget.run(Task("d", "g", work=1, fn=lambda m: m, setup=setup))[0] and built == [1, 1]

    def broken():
        raise OSError("disk gone")

    bad = Setup("build bad", work=1, fn=broken)
    with pytest.raises(OSError, match="disk gone"):
        budget.run(Task("e", "g", work=1, fn=_never, setup=bad))
    with pytest.raises(RuntimeError, match="build bad failed: disk gone"):
        budget.run(Task("f", "g", work=1, fn=_never, setup=bad))
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0)
    with pytest.raises(ValueError, match="exceed the reserve"):
        TimeBudget(5, reserve_s=5)


def _gpu_like_report() -> dict:
    """Report data shaped like a GPU run's (CUDA environment, OOM, TensorRT rows), for the GPU-only rendering."""
    fast = {"median_ms": 40.0, "p90_ms": 41.0, "min_ms": 39.0, "images_per_s": 3200.0}
    slow = {"median_ms": 80.0, "p90_ms": 81.0, "min_ms": 79.0, "images_per_s": 1600.0}
    eq = {"samples": 16, "fp32_max_rel": 2e-6, "fp32_passed": True, "fp64_max_rel": 1e-15, "fp64_passed": True,
          "fp32_noise_training_vs_fp64": 1e-6, "fp16_cosine": 0.99999, "fp16_top1_agreement": 1.0,
          "fp16_max_rel": 1e-3, "fp16_passed": True, "passed": True}
    report = {
        "environment": {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "gpu_memory_gib": 79.1,
                        "driver": "570.86", "torch": "2.11.0", "cuda": "12.8", "cudnn": 91000, "python": "3.12.3",
                        "installed": {"onnx": "1.18"}, "cudnn_benchmark": True, "tf32_matmul": False,
                        "tf32_cudnn": False},
        "config": {"batch": 128, "size": 224, "iters": 20, "warmup": 5},
        "budget": {"budget_s": 300, "elapsed_s": 299.0, "done": [{}], "dropped": [
            {"key": "repvgg_b3 training fp32", "estimate_s": 42.0, "left_s": 3.5, "reason": "estimated 42.0 s"}]},
        "unavailable": {}, "onnx": {"repvgg_a0": {"summary": "max rel err 1e-07", "passed": True}},
        "throughput": {"repvgg_a0": {"training": {"fp32": slow, "fp16": {"error": "OOM"}},
                                     "deploy": {"fp32": fast, "fp16": fast}},
                       "resnet18": {"training": {"fp32": slow, "fp16": slow}, "deploy": {"fp32": fast}},
                       "repvgg_b3": {"training": {"fp32": {"dropped": "estimated 42.0 s"}}}},
        "equivalence": {"repvgg_a0": eq, "resnet18": {**eq, "fp16_passed": False, "passed": False},
                        "repvgg_b3": {"error": "CUDA error: an illegal memory access"}},
        "tensorrt": {"backend": "tensorrt", "version": "10.9", "rows": {"repvgg_a0": {
            "fp32": {"build_seconds": 20.0, "summary": "max rel err 2e-05 (tolerance 1e-03)", "passed": True,
                     "images_per_s": 6400.0},
            "fp16": {"skipped": "an fp16 ONNX needs onnxconverter_common"},
            "int8": {"error": "BuildFailed: parser"}}}},
        "plot": {"skipped": "matplotlib is not importable (No module named 'matplotlib')"},
    }
    from repvgg_tools.bench.device_report import ratios

    report["ratios"] = ratios(report)
    return report


def test_gpu_report_renders_gpu_rows_and_lists_failures():
    from repvgg_tools.bench.device_report import failures, render

    report = _gpu_like_report()
    assert report["ratios"]["repvgg_a0"]["deploy_vs_training_fp32"] == 2.0
    assert report["ratios"]["repvgg_a0"]["vs_resnet18_fp32"] == 2.0  # deploy a0 vs torchvision resnet18 as shipped
    assert report["ratios"]["repvgg_a0"]["deploy_vs_training_fp16"] is None  # its training row ran out of memory
    text = render(report)
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0, 79.1 GiB), driver 570.86" in text
    assert "| repvgg_a0 | 3256 | 1600 | 3200 | 2.00x | OOM | 3200 | — |" in text
    assert "| repvgg_a0 | 2.00 | 1.33 | — | 4.53 |" in text
    assert "| repvgg_b3 | — | dropped (budget) | — |" in text and "repvgg_a0 training fp16: OOM" in text
    assert "| repvgg_b3 training fp32 | 42.0 | 3.5 | estimated 42.0 s |" in text
    assert "**FAILED** (fp16)" in text and "error: CUDA error: an illegal memory access" in text
    assert "| repvgg_a0 | fp32 | 20.0 | max rel err 2e-05 (tolerance 1e-03) | **ok** | 6400 | 2.00x (fp32) |" in text
    assert "| repvgg_a0 | fp16 |" in text and "skipped" in text
    assert "PNG skipped: matplotlib is not importable" in text
    assert failures(report) == ["resnet18 equivalence", "repvgg_b3 equivalence (CUDA error: an illegal memory access)",
                                "repvgg_a0 TensorRT int8 (BuildFailed: parser)"]
