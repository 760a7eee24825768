"""tools/int8_study.py in a real process (smoke mode), and the SQNR and dataset functions it is built on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from repvgg_tools.bench.quant_study import (
    SHAPES_CLASSES,
    activation_statistics,
    quantize_activation,
    quantize_weight,
    shapes_dataset,
    sqnr_db,
    weight_statistics,
)
from repvgg_tools.export.calibration import MIN_HELD_OUT
from repvgg_tools.export.int8 import Int8Floors

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "int8_study.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=120)


def test_sqnr_hand_computed():
    x = np.array([3.0, -4.0, 0.0, 12.0])
    q = np.array([3.0, -3.0, 1.0, 12.0])  # noise energy 1 + 1 = 2, signal 9 + 16 + 144 = 169
    assert sqnr_db(x, q) == pytest.approx(10 * math.log10(169 / 2), abs=1e-12)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(np.zeros(3), np.ones(3)) == -math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(x, q[:3])
    # a wrong formula (amplitude ratio, or dB of 20 log10) fails the hand-computed value
    assert sqnr_db(x, q) != pytest.approx(20 * math.log10(169 / 2), abs=1e-3)


def test_quantizers_and_statistics():
    # per-channel quantization of a weight with one outlier channel keeps the small channel; per-tensor crushes it
    w = np.stack([np.linspace(-1, 1, 9), np.linspace(-0.001, 0.001, 9)]).reshape(2, 1, 3, 3)
    np.testing.assert_allclose(quantize_weight(w)[1], w[1], atol=0.001 / 127)
    assert np.abs(quantize_weight(w, per_channel=False)[1]).max() == 0  # 0.001 < half a step of 1/127
    stats = weight_statistics(w)
    assert stats["sqnr_per_channel"] > stats["sqnr_per_tensor"]
    assert stats["range_spread"] == pytest.approx(1000.0)
    # activations: levels -128..127 at threshold/127, clipping above the threshold
    np.testing.assert_allclose(quantize_activation(np.array([0.5, 2.0, -3.0]), 1.27), [0.5, 1.27, -1.28])
    with pytest.raises(ValueError):
        quantize_activation(np.ones(2), 0.0)
    a = np.concatenate([np.ones(9999), [50.0]])
    s = activation_statistics(a, {"minmax": 50.0, "clip": 1.0})
    assert s["outlier_ratio"] == pytest.approx(50.0 / np.percentile(np.abs(a), 99.9))
    assert s["sqnr_clip"] == pytest.approx(sqnr_db(a, np.minimum(a, 1.0)))


def test_shapes_dataset_deterministic():
    x1, y1 = shapes_dataset("train", 48, 16, seed=3)
    x2, y2 = shapes_dataset("train", 48, 16, seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = shapes_dataset("train", 48, 16, seed=4)
    assert not np.array_equal(x1, x3)
    x4, _ = shapes_dataset("test", 48, 16, seed=3)  # another split: other images
    assert not np.array_equal(x1, x4)
    assert x1.shape == (48, 3, 16, 16) and x1.dtype == np.float32 and y1.dtype == np.int64
    assert sorted(set(y1.tolist())) == list(range(SHAPES_CLASSES))
    with pytest.raises(ValueError):
        shapes_dataset("holdout", 4)


@pytest.mark.slow
def test_study_smoke(tmp_path):
    out = tmp_path / "study"
    proc = _run("--out", str(out), "--smoke", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    methods = report["config"]["methods"]
    assert methods == ["minmax", "percentile", "entropy"]
    assert set(report["datasets"]) == {"digits", "shapes"}
    for ds, section in report["datasets"].items():
        assert set(section["families"]) == {"repvgg", "qarepvgg"}
        for fam, r in section["families"].items():
            acc = r["accuracy"]
            assert set(acc) >= {"fp32", "qat_int8", *(f"ptq_{m}" for m in methods)}
            assert all(0.0 <= v <= 1.0 for v in acc.values()), acc
            # every int8 row's verdict is the documented floors applied to its own figures (a smoke model is
            # untrained: some rows fail the floors, and must say so)
            assert set(r["agreement"]) == {"qat_int8", *(f"ptq_{m}" for m in methods)}
            for key, row in r["agreement"].items():
                assert row["passed_floors"] == _meets_floors(row), (ds, fam, key, row)
            # stem, stage blocks at depths 1 2 1 1 1 (stages.0.1 keeps its width and stride: identity), classifier
            assert [(row["layer"], row["identity"]) for row in r["layers"]] == [
                ("stem.reparam", False), ("stages.0.0.reparam", False), ("stages.0.1.reparam", True),
                ("stages.1.0.reparam", False), ("stages.2.0.reparam", False), ("stages.3.0.reparam", False),
                ("head.fc", False)]
            assert {"id_weight_sqnr_per_channel_mean", "noid_weight_max_over_std_max"} <= set(r["summary"])
            for row in r["layers"]:
                assert {"sqnr_per_channel", "sqnr_per_tensor", "range_spread"} <= set(row["weight"])
                assert {"outlier_ratio", *(f"sqnr_{m}" for m in methods)} <= set(row["activation"])
                assert row["weight"]["sqnr_per_channel"] > 20  # 8-bit weights: ~40 dB
            assert f"Per layer, {fam} on {ds}:" in md
            assert f"| {fam} | {r['params']} | " in md
            assert f"| {fam} | id | " in md and "| stages.0.1.reparam (id) |" in md
    assert "ptq minmax | ptq percentile | ptq entropy | qat int8" in md
    # never overwrite without --force: one error line, exit 2, the report untouched
    before = (out / "report.json").read_bytes()
    again = _run("--out", str(out), "--smoke", "--quiet")
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "already exists" in lines[0], again.stderr
    assert (out / "report.json").read_bytes() == before


def _meets_floors(row: dict) -> bool:
    floors = Int8Floors()
    return (row["top1_agreement"] >= floors.min_top1 and row["cosine"] >= floors.min_cosine
            and row["rel_error"] <= floors.max_rel_error)


@pytest.mark.slow
def test_study_establishes_trained_accuracy_and_int8_agreement(tmp_path):
    """What the study is for, on a tiny real run (digits, 3 epochs, 16x16, seconds): the fp32 models learn (held-out
    top-1 far above the 10% of chance), int8 PTQ keeps their answers (agreement with fp32 meets the documented
    Int8Floors, and the study says so), and every row's floor verdict is the floors applied to its own figures."""
    out = tmp_path / "trained"
    proc = _run("--out", str(out), "--quiet", "--datasets", "digits", "--epochs", "3", "--methods", "minmax",
                "--qat-epochs", "0", "--image-size", "16", "--width", "8", "--depths", "1", "1", "1", "1", "1",
                "--calib-samples", "64")
    assert proc.returncode == 0, proc.stderr
    section = json.loads((out / "report.json").read_text())["datasets"]["digits"]
    assert section["classes"] == 10 and section["samples"]["test"] >= MIN_HELD_OUT
    for fam, r in section["families"].items():
        assert set(r["accuracy"]) == {"fp32", "ptq_minmax"} and set(r["agreement"]) == {"ptq_minmax"}, fam
        assert r["accuracy"]["fp32"] >= 0.8, (fam, r["accuracy"])  # chance: 0.1
        row = r["agreement"]["ptq_minmax"]
        assert row["passed_floors"] and _meets_floors(row), (fam, row)
        assert abs(r["accuracy"]["ptq_minmax"] - r["accuracy"]["fp32"]) <= 1 - row["top1_agreement"], (fam, r)


def test_study_bad_arguments(tmp_path):
    proc = _run("--out", str(tmp_path / "x"), "--depths", "2", "1", "1", "1", "1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
