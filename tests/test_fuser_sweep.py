"""tools/fuser_sweep.py: the graph fuser over networks nobody wrote it for; the sweep must pass real fusions and fail
a wrong one."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _sweep_module():
    spec = importlib.util.spec_from_file_location("fuser_sweep", ROOT / "tools" / "fuser_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_reports_real_fusions(tmp_path, capsys):
    from repvgg_tools.contract import GRAPH_FUSER_RTOL

    sweep = _sweep_module()
    code = sweep.main(["--models", "tv:resnet18", "timm:repvgg_a0", "--size", "32", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().out
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert rows["tv:resnet18"]["fused"] == 20 and rows["tv:resnet18"]["bn_left"] == 0
    assert rows["timm:repvgg_a0"]["fused"] == 22 and rows["timm:repvgg_a0"]["bn_left"] == 0
    assert all(r["class_kept"] and r["max_rel"] <= GRAPH_FUSER_RTOL for r in rows.values())
    assert "2 of 2 models fused and within" in capsys.readouterr().out
    assert "| tv:resnet18 | 20 | 20 -> 0 |" in (tmp_path / "sweep.md").read_text()
    before = (tmp_path / "sweep.json").read_bytes()
    with pytest.raises(SystemExit) as exit_:  # an existing sweep is not overwritten without --force
        sweep.main(["--models", "tv:resnet18", "--size", "32", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "use --force" in capsys.readouterr().err
    assert (tmp_path / "sweep.json").read_bytes() == before


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_sweep_fails_a_wrong_fusion_just_beyond_the_fuser_tolerance(monkeypatch, capsys, tmp_path, factor):
    """Hand the sweep a fuser whose result is off by ``factor`` times the contract's graph-fuser tolerance (the
    classifier's weight and bias scaled by ``1 + factor * GRAPH_FUSER_RTOL``, so every output is off by exactly that,
    relative): at twice the tolerance it must say FAILED and exit 1 (the old fp32 1e-4 sweep passed this); at half,
    pass."""
    from repvgg_tools.contract import GRAPH_FUSER_RTOL
    from repvgg_tools.fx import fuser as graph_fuser

    real = graph_fuser.graph_fuse

    def wrong(model, *args, **kwargs):
        fused, report = real(model, *args, **kwargs)
        fused = copy.deepcopy(fused)
        fc = [m for m in fused.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            fc.weight.mul_(1 + factor * GRAPH_FUSER_RTOL)
            fc.bias.mul_(1 + factor * GRAPH_FUSER_RTOL)
        return fused, report

    monkeypatch.setattr(graph_fuser, "graph_fuse", wrong)
    code = _sweep_module().main(["--models", "tv:resnet18", "--size", "32", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    max_rel = json.loads((tmp_path / "sweep.json").read_text())["tv:resnet18"]["max_rel"]
    assert max_rel == pytest.approx(factor * GRAPH_FUSER_RTOL, rel=1e-3)  # the injected error, nothing else
    if factor > 1:
        assert code == 1 and "FAILED" in out and "failed: tv:resnet18" in out
    else:
        assert code == 0 and "FAILED" not in out


def test_sweep_bad_arguments_fail_in_one_line():
    for args, needle in ((["--models", "resnet18"], "write tv:NAME or timm:NAME"), (["--size", "8"], "at least 32")):
        proc = subprocess.run([sys.executable, "tools/fuser_sweep.py", *args], cwd=ROOT, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and needle in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
