"""repvgg_tools.contract: the only place tolerances are defined, and the one measure every check judges."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from repvgg_tools import contract
from repvgg_tools.contract import FP16_RTOL, FP32_RTOL, FP64_RTOL, max_errors, rtol_for

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE_NAME = re.compile(r"RTOL|_TOL|FLOOR|MIN_COSINE|MIN_TOP1|MAX_REL_ERROR")
TOLERANCE_ARG = re.compile(r"^(rtol|atol|\w+_tol)$")


def _is_number(node: ast.AST | None) -> bool:
    if isinstance(node, ast.UnaryOp):
        return _is_number(node.operand)
    if isinstance(node, ast.BinOp):
        return _is_number(node.left) and _is_number(node.right)
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _tolerances_defined(path: Path) -> list[str]:
    """``file:line name`` of every module- or class-level tolerance name assigned a number, and every function
    argument named like a tolerance with a number as its default."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    bodies = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for body in bodies:
        for node in body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            for t in targets:
                name = t.id if isinstance(t, ast.Name) else ""
                if _is_number(node.value) and (TOLERANCE_NAME.search(name) or
                                               (body is not tree.body and TOLERANCE_NAME.search(name.upper()))):
                    found.append(f"{where}:{node.lineno} {name}")
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        args = fn.args.posonlyargs + fn.args.args
        pairs = list(zip(args[len(args) - len(fn.args.defaults):], fn.args.defaults, strict=True))
        pairs += [(a, d) for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults, strict=True) if d is not None]
        found += [f"{where}:{d.lineno} {fn.name}({a.arg}=...)" for a, d in pairs
                  if TOLERANCE_ARG.match(a.arg) and _is_number(d)]
    return found


def test_tolerances_are_defined_only_in_the_contract():
    files = sorted([*(ROOT / "repvgg_tools").rglob("*.py"), *(ROOT / "tools").rglob("*.py")])
    assert len(files) > 20
    contract_file = ROOT / "repvgg_tools" / "contract.py"
    seen = {hit.split(" ", 1)[1] for hit in _tolerances_defined(contract_file)}  # the guard sees what it looks for
    assert {"FP32_RTOL", "FUSION_RTOL", "ENGINE_FP32_RTOL", "FP16_MIN_COSINE", "INT8_MAX_REL_ERROR"} <= seen
    elsewhere = [hit for f in files if f != contract_file for hit in _tolerances_defined(f)]
    assert not elsewhere, "tolerances defined outside repvgg_tools/contract.py: " + "; ".join(elsewhere)


def test_the_guard_catches_a_stray_tolerance(tmp_path):
    stray = tmp_path / "stray.py"
    stray.write_text("X_RTOL = 1e-6\nSIZE = 3\n\n\nclass Floors:\n    min_cosine: float = 0.9\n\n\n"
                     "def check(a, *, rtol=1e-3, size=4):\n    return a\n")
    hits = _tolerances_defined(stray)
    assert [h.split(" ", 1)[1] for h in hits] == ["X_RTOL", "min_cosine", "check(rtol=...)"]


def test_rtol_for_reads_the_table():
    assert rtol_for(torch.float32) == rtol_for(np.float32) == rtol_for("float32") == FP32_RTOL == 1e-5
    assert rtol_for(torch.float64) == rtol_for(np.dtype("float64")) == FP64_RTOL == 1e-12
    assert rtol_for(torch.float16) == rtol_for("torch.float16") == FP16_RTOL
    assert rtol_for(torch.bfloat16) == contract.BF16_RTOL
    with pytest.raises(ValueError, match="no tolerance for dtype int8"):
        rtol_for(torch.int8)


@pytest.mark.parametrize("kind", ["torch", "numpy", "mixed"])
def test_max_errors_is_relative_to_the_reference_scale(kind):
    """The same absolute error (1e-3) is a pass on a reference of scale 1e4 (1e-7 relative) and a fail on one of scale
    1 (1e-3 relative), against the fp32 tolerance; exact figures, whatever the input type."""
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(3, 5, generator=gen, dtype=torch.float64) * 0.5
    base[1, 2] = 1.0  # max|reference| of the small-scale case is exactly 1
    error = torch.zeros_like(base)
    error[0, 4] = 1e-3

    def as_kind(t, which):  # mixed: a numpy candidate against a torch reference
        return t.numpy() if kind == "numpy" or (kind == "mixed" and which == "candidate") else t

    for scale, passes in ((1e4, True), (1.0, False)):
        ref = base * scale
        max_abs, max_rel = max_errors(as_kind(ref + error, "candidate"), as_kind(ref, "reference"))
        assert max_abs == pytest.approx(1e-3, rel=1e-9)
        assert max_rel == pytest.approx(1e-3 / scale, rel=1e-9)
        assert (max_rel <= FP32_RTOL) is passes, (scale, max_rel)
    # a correct answer is exactly right, a NaN is never right
    assert max_errors(as_kind(base, "candidate"), as_kind(base, "reference")) == (0.0, 0.0)
    nan = base.clone()
    nan[2, 2] = float("nan")
    assert max_errors(as_kind(nan, "candidate"), as_kind(base, "reference")) == (float("inf"), float("inf"))


def test_max_errors_structures_and_mismatches():
    a, b = torch.ones(2, 3), np.ones((2, 3))
    assert max_errors({"x": a, "y": [a, a]}, {"y": [b, b * 2], "x": b}) == (1.0, 0.5)  # dicts by key
    assert max_errors(torch.ones(2, dtype=torch.bfloat16), torch.ones(2)) == (0.0, 0.0)
    assert max_errors(np.zeros(3), np.zeros(3)) == (0.0, 0.0)
    assert max_errors(np.ones(3), np.zeros(3)) == (1.0, float("inf"))
    with pytest.raises(ValueError, match="count"):
        max_errors([a, a], [a])
    with pytest.raises(ValueError, match="shapes differ"):
        max_errors(a, np.ones((3, 2)))
    with pytest.raises(TypeError, match="cannot compare"):
        max_errors(1.0, 1.0)


def test_every_checker_uses_the_one_measure():
    """The torch, numpy, int8 and float64-fuser comparisons agree with max_errors on the same wrong answer."""
    from repvgg_tools.export.int8 import int8_metrics
    from repvgg_tools.export.metrics import output_metrics
    from repvgg_tools.verify import compare_outputs

    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(8, 10, generator=gen, dtype=torch.float64) * 100
    cand = ref + torch.randn(8, 10, generator=gen, dtype=torch.float64) * 1e-2
    expected = max_errors(cand, ref)
    assert 1e-6 < expected[1] < 1e-3
    assert compare_outputs(cand, ref) == expected
    metrics = output_metrics([cand.numpy()], [ref.numpy()])
    assert (metrics["max_abs"], metrics["max_rel"]) == expected
    assert int8_metrics([cand.numpy()], [ref.numpy()])["max_rel"] == expected[1]


# A user's network whose blocks fuse themselves (``switch_to_deploy``, as YOLOv6 and the official RepVGG do), in the
# dtype the factory names; ``error`` makes the block's own fusion wrong by that much, relative, on purpose.
USER_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    class TwoBranch(nn.Module):
        def __init__(self, c, error=0.0):
            super().__init__()
            self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
            self.error = error

        def forward(self, x):
            if hasattr(self, "fused"):
                return torch.relu(self.fused(x))
            return torch.relu(self.k3(x) + self.k1(x))

        @torch.no_grad()
        def switch_to_deploy(self):
            kernels, biases = [], []
            for branch in (self.k3, self.k1):
                conv, bn = branch
                std = (bn.running_var.double() + bn.eps).sqrt()
                w = conv.weight.double() * (bn.weight.double() / std).reshape(-1, 1, 1, 1)
                kernels.append(nn.functional.pad(w, [(3 - w.shape[-1]) // 2] * 4))
                biases.append(bn.bias.double() - bn.running_mean.double() * bn.weight.double() / std)
            dtype = self.k3[0].weight.dtype
            self.fused = nn.Conv2d(self.k3[0].in_channels, self.k3[0].out_channels, 3, padding=1).to(dtype)
            self.fused.weight.copy_(sum(kernels) * (1 + self.error))
            self.fused.bias.copy_(sum(biases) * (1 + self.error))
            del self.k3, self.k1


    def _net(dtype, error=0.0):
        return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), TwoBranch(16, error), TwoBranch(16, error),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(dtype)


    def fp16():
        return _net(torch.float16)


    def fp64():
        return _net(torch.float64)


    def fp32():
        return _net(torch.float32)
''')

FIGURES = re.compile(r"max rel err ([0-9.e+-]+) \(tolerance ([0-9.e+-]+)\)")


@pytest.fixture(scope="module")
def user_cli(tmp_path_factory):
    """``repvgg-convert --model contract_user_net:FACTORY train.pth OUT [--rtol R]`` in a real process, with a training
    checkpoint of that factory's model (randomized BatchNorm statistics, in its dtype)."""
    from repvgg_tools import randomize_batchnorm
    from repvgg_tools.io.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("contract_user")
    (folder / "contract_user_net.py").write_text(USER_CODE)
    namespace: dict = {}
    exec(compile(USER_CODE, "contract_user_net.py", "exec"), namespace)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    runs = iter(range(100))

    def run(factory: str, *args) -> tuple[subprocess.CompletedProcess, float, float]:
        torch.manual_seed(0)
        model = randomize_batchnorm(namespace[factory](), seed=1).eval()
        n = next(runs)
        ckpt, out = folder / f"train{n}.pth", folder / f"deploy{n}.pth"
        save_checkpoint({"state_dict": model.state_dict()}, ckpt)
        proc = subprocess.run([sys.executable, "-m", "repvgg_tools.cli.convert", str(ckpt), str(out), "--model",
                               f"contract_user_net:{factory}", "--input-shape", "2", "3", "32", "32", *args],
                              env=env, capture_output=True, text=True, timeout=300)
        match = FIGURES.search(proc.stdout + proc.stderr)
        assert match, proc.stdout + proc.stderr
        assert (proc.returncode == 0) == out.exists()  # nothing written on failure
        return proc, float(match.group(1)), float(match.group(2))

    return run


def test_user_model_fp16_is_judged_at_fp16s_tolerance(user_cli):
    """A correct fp16 model passes at the contract's fp16 tolerance; the old fixed 1e-5 refused it."""
    proc, rel, tol = user_cli("fp16")
    assert proc.returncode == 0, proc.stderr
    assert tol == FP16_RTOL and 1e-5 < rel < FP16_RTOL / 5, rel  # fp16 rounding of the fused weights
    proc, rel_old, tol = user_cli("fp16", "--rtol", "1e-5")  # the old default
    assert proc.returncode == 1 and tol == 1e-5 and rel_old == rel and "nothing written" in proc.stderr


def _wrong_fusion(monkeypatch, error: float) -> None:
    """The fuser hands convert_user_model's final check a deploy model whose fused weights are off by ``error``,
    relative (the blocks' own checks would undo a wrong method, so the wrong answer is injected after them)."""
    import repvgg_tools.fx.convert as user_convert

    real = user_convert.reparameterize

    def wrong(model, *args, **kwargs):
        deploy, report = real(model, *args, **kwargs)
        with torch.no_grad():
            for p in deploy.parameters():
                p.mul_(1 + error)
        return deploy, report

    monkeypatch.setattr(user_convert, "reparameterize", wrong)


def _user_checkpoint(tmp_path, factory: str):
    from repvgg_tools import randomize_batchnorm
    from repvgg_tools.io.checkpoint import save_checkpoint

    namespace: dict = {}
    exec(compile(USER_CODE, "contract_user_net.py", "exec"), namespace)
    torch.manual_seed(0)
    model = randomize_batchnorm(namespace[factory](), seed=1).eval()
    save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "train.pth")
    return namespace[factory], tmp_path / "train.pth"


def test_user_model_fp64_is_judged_at_1e_12(user_cli, tmp_path, monkeypatch):
    """A correct float64 model lands far below 1e-12; one whose fused weights are off by 1e-9 relative is refused at
    the float64 tolerance, though it passes the fp32 1e-5 the old code judged every model at."""
    from repvgg_tools.fx.convert import FusionVerificationError, convert_user_model

    proc, rel, tol = user_cli("fp64")
    assert proc.returncode == 0 and tol == FP64_RTOL and rel < 1e-14, proc.stdout + proc.stderr
    factory, ckpt = _user_checkpoint(tmp_path, "fp64")
    _wrong_fusion(monkeypatch, 1e-9)
    with pytest.raises(FusionVerificationError) as failed:
        convert_user_model(factory, ckpt, tmp_path / "out.pth", input_shape=(2, 3, 32, 32))
    rel = failed.value.result.max_rel
    assert failed.value.result.rtol == FP64_RTOL and 1e-10 < rel < 1e-8 and not (tmp_path / "out.pth").exists()
    report = convert_user_model(factory, ckpt, tmp_path / "out.pth", input_shape=(2, 3, 32, 32), rtol=FP32_RTOL)
    assert report["verify"]["max_rel"] == pytest.approx(rel, rel=1e-3)


def test_user_model_fp32_wrong_fusion_fails(tmp_path, monkeypatch):
    from repvgg_tools.fx.convert import FusionVerificationError, convert_user_model

    factory, ckpt = _user_checkpoint(tmp_path, "fp32")
    _wrong_fusion(monkeypatch, 1e-4)
    with pytest.raises(FusionVerificationError) as failed:
        convert_user_model(factory, ckpt, tmp_path / "out.pth", input_shape=(2, 3, 32, 32))
    assert failed.value.result.rtol == FP32_RTOL and failed.value.result.max_rel > FP32_RTOL
