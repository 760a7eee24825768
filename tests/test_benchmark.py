"""tools/benchmark.py (repvgg-bench): a tiny real run writes a consistent report; bad arguments fail in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "repvgg_tools.cli.benchmark"]  # run with cwd=ROOT: this checkout's code


@pytest.mark.slow
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([*BENCH, "--models", "repvgg_a0", "--batch", "1", "--size",
                           "64", "--iters", "2", "--warmup", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = subprocess.run([*BENCH, "--models", "repvgg_a0", "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)  # an existing report is never overwritten without --force
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr, again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    report = json.loads((out / "report.json").read_text())
    res = report["models"]["repvgg_a0"]
    rows = res["rows"]
    auto = [k for k in rows if k.startswith("ours auto (")]
    assert len(auto) == 1 and auto[0][len("ours auto ("):-1] in ("torch", "torch_channels_last", "onnxruntime")
    assert set(rows) == {"ours training", "ours deploy NCHW", "ours deploy channels_last", "onnxruntime (deploy)",
                         "timm training", "timm deploy", auto[0]}
    # published parameter counts (1000 classes); timm's model has the same architecture
    assert rows["ours training"]["params"] == rows["timm training"]["params"] == 9_108_968
    assert rows["ours deploy NCHW"]["params"] == rows["timm deploy"]["params"] == 8_309_384
    # FLOPs of the deploy form, counted independently from the conv/linear shapes (2 x MACs)
    from repvgg_tools import create_model

    macs, hw = 0, 64
    model = create_model("repvgg_a0", deploy=True)
    for block in [model.stem, *[b for stage in model.stages for b in stage]]:
        hw //= block.reparam.stride[0]
        macs += block.reparam.weight.numel() * hw * hw
    macs += model.head.fc.weight.numel()
    assert res["flops"] == 2 * macs
    assert report["machine"]["peak_gflops"] > 0
    # observable properties, not the code's formulas: a faster row has the higher throughput; the summary's ratios
    # point the same way as the timings in the same report, and the markdown prints the JSON's figures
    assert all(row["median_ms"] > 0 and row["images_per_s"] > 0 for row in rows.values())
    by_time = sorted(rows, key=lambda k: rows[k]["median_ms"])
    by_throughput = sorted(rows, key=lambda k: -rows[k]["images_per_s"])
    assert by_time == by_throughput
    s = res["summary"]
    deploy_rows = [k for k in ("ours deploy NCHW", "ours deploy channels_last", "onnxruntime (deploy)")]
    assert s["fastest_deploy"] == min(deploy_rows, key=lambda k: rows[k]["median_ms"])
    fastest, training = rows[s["fastest_deploy"]], rows["ours training"]
    assert (s["deploy_speedup_vs_training"] > 1) == (fastest["median_ms"] < training["median_ms"])
    assert (s["ours_vs_timm_deploy"] > 1) == (rows["ours deploy NCHW"]["median_ms"] < rows["timm deploy"]["median_ms"])
    assert 0 < s["auto_vs_fastest"] and s["torch_deploy_vs_fastest"] <= 1
    text = (out / "report.md").read_text()
    assert "fastest_cpu_runner" in text and f"**{s['deploy_speedup_vs_training']:.2f}x**" in text
    assert "## repvgg_a0" in text and "| ours deploy channels_last | 8,309,384 |" in text and "matmul peak" in text
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_rejects_unknown_model(tmp_path):
    proc = subprocess.run([*BENCH, "--models", "resnet50", "--out", str(tmp_path / "b")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown model(s) resnet50"
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_benchmark_fuser_report(tmp_path):
    """--fuser on one small timm family: timings measured in one run, ratios that match them, and our fused model
    within 1e-5 of timm's with no more convs and no BatchNorm left."""
    out = tmp_path / "bench"
    proc = subprocess.run([*BENCH, "--fuser", "--fuser-models", "repvgg_a0", "--threads",
                           "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "report.json").read_text())["fuser"]["repvgg_a0"]
    assert row["timm_s"] > 0 and row["ours_s"] > 0 and row["whole_model_s"] > 0
    # the ratios point the same way as the timings reported next to them
    assert (row["ratio"] > 1) == (row["ours_s"] > row["timm_s"])
    assert (row["whole_model_ratio"] > 1) == (row["whole_model_s"] > row["timm_s"])
    assert (row["median"]["ratio"] > 1) == (row["median"]["ours_s"] > row["median"]["timm_s"])
    assert row["timm_s"] <= row["median"]["timm_s"] and row["ours_s"] <= row["median"]["ours_s"]
    assert row["max_rel_vs_timm"] <= 1e-5 and row["fused"] == 22 and not row["skipped"]
    assert row["ours"]["BatchNorm"] == 0 and row["ours"]["Conv2d"] <= row["timm"]["Conv2d"]
    assert "| repvgg_a0 |" in (out / "report.md").read_text()


def test_benchmark_fuser_rejects_unknown_timm_model(tmp_path):
    proc = subprocess.run([*BENCH, "--fuser", "--fuser-models", "resnet9000", "--out",
                           str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --fuser-models: timm ")
    assert "resnet9000" in proc.stderr and "Traceback" not in proc.stderr and not (tmp_path / "b").exists()
