"""convert_user_model: a user's own block, unknown to every library, built from their code, fused, verified, saved."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from repvgg_tools import randomize_batchnorm, reparameterize
from repvgg_tools.conversion.layouts import ConversionError
from repvgg_tools.fx.convert import FusionVerificationError, convert_user_model, load_factory
from repvgg_tools.io.checkpoint import CheckpointError, save_checkpoint
from repvgg_tools.verify import compare_outputs

USER_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    class TriBranch(nn.Module):
        """A block no library knows: 3x3 + 1x3 + (avg pool -> BN) branches, a layer scale, a residual."""

        def __init__(self, c):
            super().__init__()
            self.square = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            self.wide = nn.Sequential(nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(c))
            self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(c))
            self.scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

        def forward(self, x):
            return torch.relu(x + self.scale * (self.square(x) + self.wide(x) + self.pool(x)))


    def build(width=8, classes=5):
        return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                             TriBranch(width), TriBranch(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, classes))
''')


@pytest.fixture()
def user_model(tmp_path, monkeypatch):
    (tmp_path / "user_blocks_fuser_test.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    build = load_factory("user_blocks_fuser_test:build")
    torch.manual_seed(0)
    model = randomize_batchnorm(build(), seed=3).eval()
    ckpt = tmp_path / "train.pth"
    save_checkpoint({"state_dict": model.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1}}, ckpt)
    return model, ckpt, build


def test_convert_user_model_fuses_verifies_saves_and_exports(user_model, tmp_path):
    model, ckpt, build = user_model
    out, onnx_path = tmp_path / "deploy.pth", tmp_path / "deploy.onnx"
    report = convert_user_model("user_blocks_fuser_test:build", ckpt, out, export_onnx=onnx_path,
                                input_shape=(1, 3, 32, 32))
    # two TriBranch blocks (the stem conv+BN folds in its Sequential before the graph fuser runs)
    assert report["fused"] == 2 and report["verify"]["passed"] and report["verify"]["max_rel"] <= 1e-5
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 7 and "optimizer" not in saved and "fused" in saved["fuse_report"]
    assert not any("running_mean" in k for k in saved["state_dict"])
    # the saved weights load into the structure reparameterize gives the same trained model
    deploy = reparameterize(model)
    deploy.load_state_dict(saved["state_dict"])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert compare_outputs(deploy(x), ref)[1] <= 1e-5
    import onnx

    from repvgg_tools.export.onnx import onnx_session, run_onnx

    proto = onnx.load(str(onnx_path))
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "AveragePool" not in ops and "Mul" not in ops, ops
    got = run_onnx(onnx_session(str(onnx_path)), x)[0]
    assert compare_outputs(torch.from_numpy(got), ref)[1] <= 1e-5


def test_convert_user_model_refuses_bad_inputs(user_model, tmp_path):
    _, ckpt, _ = user_model
    out = tmp_path / "deploy.pth"
    with pytest.raises(ConversionError, match="package.module:factory"):
        convert_user_model("no_colon_here", ckpt, out)
    with pytest.raises(ConversionError, match="cannot import"):
        convert_user_model("no_such_module_xyz:build", ckpt, out)
    with pytest.raises(ConversionError, match="no attribute"):
        convert_user_model("user_blocks_fuser_test:missing", ckpt, out)
    with pytest.raises(ConversionError, match="does not fit"):
        convert_user_model("user_blocks_fuser_test:build", ckpt, out, factory_kwargs={"width": 4})
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_user_model("user_blocks_fuser_test:build", ckpt, out)
    assert out.read_bytes() == b"keep me"


def test_convert_user_model_verification_catches_a_wrong_fusion(user_model, tmp_path, monkeypatch):
    """Hand the checker a wrong answer (one fused weight perturbed): it must fail and write nothing."""
    _, ckpt, _ = user_model
    import repvgg_tools.fx.convert as gc

    real = gc.reparameterize

    def corrupted(*args, **kwargs):
        deploy, report = real(*args, **kwargs)
        with torch.no_grad():
            next(p for n, p in deploy.named_parameters() if "fused" in n).mul_(1.001)
        return deploy, report

    monkeypatch.setattr(gc, "reparameterize", corrupted)
    out = tmp_path / "deploy.pth"
    with pytest.raises(FusionVerificationError, match="verification failed"):
        convert_user_model("user_blocks_fuser_test:build", ckpt, out, input_shape=(1, 3, 16, 16))
    assert not out.exists()
    assert isinstance(load_factory("user_blocks_fuser_test:TriBranch")(4), nn.Module)


def test_docs_custom_block_example_runs(capsys):
    """The example in docs/fuser.md fuses and exports as it says."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "fuser.md").read_text()
    block = text.split("### Your own block", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/fuser.md", "exec"), {})
    out = capsys.readouterr().out
    assert "fused 2 sub-graphs" in out and "BatchNormalization" not in out and "'Conv'" in out


@pytest.mark.slow
def test_repvgg_convert_model_flag_runs_the_users_code_through_the_cli(user_model, tmp_path):
    """``repvgg-convert --model pkg.module:factory IN OUT --export-onnx M``: a real process; errors are one line."""
    import os
    import subprocess
    import sys

    _, ckpt, _ = user_model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "repvgg_tools.cli.convert", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=300)

    out, onnx_path = tmp_path / "cli_deploy.pth", tmp_path / "cli.onnx"
    proc = run(ckpt, out, "--model", "user_blocks_fuser_test:build", "--export-onnx", onnx_path,
               "--input-shape", 1, 3, 32, 32)
    assert proc.returncode == 0, proc.stderr
    assert "fused:       2 sub-graphs" in proc.stdout and out.exists() and onnx_path.exists()
    for args, words in (((ckpt, tmp_path / "x.pth", "--model", "nowhere_xyz:build"), "cannot import"),
                        ((ckpt, tmp_path / "x.pth", "--export-onnx", onnx_path), "need --model"),
                        ((ckpt, tmp_path / "x.pth", "--model", "user_blocks_fuser_test:build", "--arch", "repvgg_a0"),
                         "do not apply")):
        proc = run(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], \
            proc.stderr
