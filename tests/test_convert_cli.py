"""``repvgg-convert`` as users run it: a real process on real files, every layout, containers, and every bad input
answered with one ``error:`` line, the input untouched and nothing written."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import run_command
from convert_helpers import OURS, Detector, assert_deploy_equivalent, tiny

from repvgg_tools import randomize_batchnorm, verify_equivalence
from repvgg_tools.conversion.layouts import LAYOUTS, rename_layout


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def load(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ------------------------------------------------------------------------------------------------ layouts, formats
@pytest.mark.parametrize("layout, fmt", [
    ("ours", "zip"), ("official", "legacy"), ("mmpretrain", "container"), ("ours", "safetensors"),
])
def test_each_layout_converts_in_its_own_layout(tmp_path, layout, fmt):
    train = tiny(se_ratio=0.25 if layout != "official" else 0.0)
    sd = rename_layout(train.state_dict(), OURS, LAYOUTS[layout])
    src = tmp_path / ("in.safetensors" if fmt == "safetensors" else "in.pth")
    if fmt == "zip":
        torch.save(sd, src)
    elif fmt == "legacy":
        torch.save(sd, src, _use_new_zipfile_serialization=False)
    elif fmt == "container":  # how MMPretrain saves: meta + state_dict + optimizer
        torch.save({"meta": {"epoch": 100, "mmpretrain_version": "1.2.0"}, "state_dict": sd,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, src)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(src))
    dst = tmp_path / ("out.safetensors" if fmt == "safetensors" else "out.pth")
    before = digest(src)
    proc = ok(run_cli(src, dst, "--json", tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layout"] == report["out_layout"] == layout and report["passed"] and report["max_rel"] < 1e-5
    assert report["blocks_fused"] == 8 and f"layout:      {layout}" in proc.stdout and "max rel err" in proc.stdout
    assert digest(src) == before
    out = load(dst)
    if fmt == "container":
        assert out["meta"]["epoch"] == 100 and "optimizer" not in out
        out = out["state_dict"]
    deploy_key = {"ours": "stem.reparam.weight", "official": "stage0.rbr_reparam.weight",
                  "mmpretrain": "backbone.stem.branch_reparam.weight"}[layout]
    assert deploy_key in out and not any("rbr_dense" in k or "branch_3x3" in k for k in out)
    assert_deploy_equivalent(train, out, layout, se_ratio=0.25 if layout != "official" else 0.0)


def _timm_tiny():
    from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg

    cfg = ByoModelCfg(blocks=_rep_vgg_bcfg(d=(2, 2, 2, 1), wf=(0.125,) * 4, groups=2), stem_type="rep", stem_chs=8,
                      attn_layer="se", attn_kwargs=dict(rd_ratio=0.25, rd_divisor=1))
    return ByobNet(cfg, num_classes=5)


def test_timm_safetensors_checkpoint_loads_into_timms_deploy_model(tmp_path):
    import timm  # noqa: F401
    from safetensors.torch import save_file
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_batchnorm(_timm_tiny(), seed=5).eval()
    src, dst = tmp_path / "timm.safetensors", tmp_path / "timm_deploy.safetensors"
    save_file(model.state_dict(), str(src))
    proc = ok(run_cli(src, dst))
    assert "layout:      timm" in proc.stdout
    target = reparameterize_model(_timm_tiny())
    target.load_state_dict(load(dst), strict=True)
    assert verify_equivalence(model, target.eval(), (2, 3, 64, 64)).passed


def test_out_layout_and_prefixes_and_extras(tmp_path):
    train = tiny()
    sd = {f"module._orig_mod.{k}": v for k, v in rename_layout(train.state_dict(), OURS, LAYOUTS["official"]).items()}
    src, dst = tmp_path / "ddp.pth", tmp_path / "ours.pth"
    torch.save({"model": sd, "epoch": 12, "args": {"lr": 0.1}, "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 11}}, src)
    ok(run_cli(src, dst, "--out-layout", "ours", "--quiet"))
    out = load(dst)
    assert set(out) == {"model", "epoch", "args"} and out["epoch"] == 12 and out["args"] == {"lr": 0.1}
    assert_deploy_equivalent(train, out["model"], "ours")


@pytest.mark.slow
def test_ema_weights_are_selected(tmp_path):
    model_a, model_b = tiny(seed=1), tiny(seed=2)
    src = tmp_path / "train.pth"
    # what tools/train.py saves
    torch.save({"state_dict": model_a.state_dict(), "state_dict_ema": model_b.state_dict(), "layout": "ours",
                "num_classes": 5, "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, src)
    ok(run_cli(src, tmp_path / "a.pth", "-q"))
    ok(run_cli(src, tmp_path / "b.pth", "--ema", "-q"))
    a, b = load(tmp_path / "a.pth"), load(tmp_path / "b.pth")
    assert set(a) == {"state_dict", "layout", "num_classes", "epoch"} and set(b) == set(a)
    assert_deploy_equivalent(model_a, a["state_dict"])
    assert_deploy_equivalent(model_b, b["state_dict"])


@pytest.mark.slow
def test_zoo_arch_from_checkpoint_and_custom_arch_inferred(tmp_path):
    from repvgg_tools import create_model

    a0 = randomize_batchnorm(create_model("repvgg_a0", num_classes=10)).eval()
    torch.save({"state_dict": a0.state_dict(), "arch": "repvgg_a0"}, tmp_path / "a0.pth")
    ok(run_cli(tmp_path / "a0.pth", tmp_path / "a0_deploy.pth", "--json", tmp_path / "a0.json"))
    assert json.loads((tmp_path / "a0.json").read_text())["arch"] == "repvgg_a0"
    custom = tiny(widths=(16, 24, 40, 40, 72), depths=(1, 3, 1, 2, 1), layer_groups={3: 4})
    torch.save(custom.state_dict(), tmp_path / "custom.pth")
    ok(run_cli(tmp_path / "custom.pth", tmp_path / "custom_deploy.pth", "--json", tmp_path / "c.json"))
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["arch"].startswith("custom RepVGG(widths=[16, 24, 40, 40, 72], depths=[1, 3, 1, 2, 1]")
    assert report["verify_mode"] == "model" and report["passed"]
    assert_deploy_equivalent(custom, load(tmp_path / "custom_deploy.pth"), widths=(16, 24, 40, 40, 72),
                      depths=(1, 3, 1, 2, 1), layer_groups={3: 4})


def test_whole_detector_checkpoint(tmp_path):
    torch.manual_seed(0)
    train = randomize_batchnorm(Detector(), seed=4).eval()
    sd = train.state_dict()
    torch.save({"model": sd, "iteration": 9000}, tmp_path / "det.pth")
    proc = ok(run_cli(tmp_path / "det.pth", tmp_path / "det_deploy.pth"))
    assert "verify:      blocks, float64:" in proc.stdout
    out = load(tmp_path / "det_deploy.pth")
    assert out["iteration"] == 9000
    out = out["model"]
    assert all(torch.equal(out[k], v) for k, v in sd.items() if k.startswith("rpn."))
    deploy = Detector(deploy=True).eval()
    deploy.load_state_dict(out, strict=True)
    assert verify_equivalence(train, deploy, (2, 3, 64, 64)).passed


@pytest.mark.slow
def test_torchvision_vgg16_bn_becomes_plain_vgg16(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.vgg16_bn(num_classes=10)).eval()
    torch.save(model.state_dict(), tmp_path / "vgg16_bn.pth")
    proc = ok(run_cli(tmp_path / "vgg16_bn.pth", tmp_path / "vgg16.pth", "--json", tmp_path / "r.json",
                      script=True))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layout"] == "torchvision" and report["arch"] == "vgg16_bn" and report["blocks_fused"] == 13
    assert "wrote" in proc.stdout
    plain = torchvision.models.vgg16(num_classes=10)
    plain.load_state_dict(load(tmp_path / "vgg16.pth"), strict=True)
    assert verify_equivalence(model, plain.eval(), (2, 3, 32, 32)).passed


# --------------------------------------------------------------------------------------------------- bad inputs
class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _corrupt(sd: dict, key: str, value: float) -> dict:
    sd = dict(sd)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    return sd


BAD = {
    "missing": "no such file", "directory": "is a directory", "empty": "empty", "text": "not a checkpoint",
    "truncated": "truncated", "runs_code": "refused", "resnet": "no RepVGG blocks", "wrong_arch": "do not fit",
    "unknown_arch": "unknown arch", "nan": "NaN", "negative_var": "negative", "same_file": "is the input file",
    "exists": "already exists", "no_dir": "does not exist", "file_as_dir": "does not exist",
    "json_is_input": "is the input file", "forced_layout": "matches nothing", "deployed": "nothing to fuse",
    "bad_eps": "eps",
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.slow
def test_bad_input_one_line_error_nothing_written(tmp_path, case):
    good = tiny().state_dict()
    src, dst, args = tmp_path / "in.pth", tmp_path / "out.pth", []
    torch.save(good, src)
    if case == "missing":
        src = tmp_path / "absent.pth"
    elif case == "directory":
        src = tmp_path / "a_dir"
        src.mkdir()
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "text":
        src.write_text("weights: see attached\n")
    elif case == "truncated":
        src.write_bytes(src.read_bytes()[:-2000])
    elif case == "runs_code":
        torch.save({"state_dict": good, "x": RunsCode(tmp_path / "marker")}, src)
    elif case == "resnet":
        torchvision = pytest.importorskip("torchvision")
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), src)
    elif case == "wrong_arch":
        args = ["--arch", "repvgg_a1"]
    elif case == "json_is_input":
        args = ["--json", src, "--force"]
    elif case == "forced_layout":
        args = ["--layout", "torchvision"]
    elif case == "deployed":
        torch.save(tiny(deploy=True).state_dict(), src)
    elif case == "bad_eps":
        args = ["--bn-eps", "0"]
    elif case == "unknown_arch":
        args = ["--arch", "repvgg_x5"]
    elif case == "nan":
        torch.save(_corrupt(good, "stages.2.1.branch_3x3.conv.weight", float("nan")), src)
    elif case == "negative_var":
        torch.save(_corrupt(good, "stages.1.1.branch_identity.running_var", -1.0), src)
    elif case == "same_file":
        dst = tmp_path / "." / "in.pth"
    elif case == "exists":
        dst.write_bytes(b"keep me")
    elif case == "no_dir":
        dst = tmp_path / "no" / "such" / "dir" / "out.pth"
    elif case == "file_as_dir":
        (tmp_path / "plainfile").write_bytes(b"x")
        dst = tmp_path / "plainfile" / "out.pth"
    before_in, before_out = digest(src), digest(dst)
    proc = run_cli(src, dst, *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD[case] in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert digest(src) == before_in and digest(dst) == before_out
    if case not in ("exists", "same_file"):
        assert not dst.exists()
    assert not (tmp_path / "marker").exists()
    assert not list(tmp_path.glob(".out.pth.*"))  # no temp file left behind


def test_usage_error_exit_code():
    proc = run_cli("only_one_argument.pth")
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_verification_failure_exits_1_and_writes_nothing(tmp_path):
    """A float16 checkpoint passes the one default tolerance (the fusion is float64 whatever the dtype), and fails
    an explicit tolerance below what float64 arithmetic reaches."""
    train = tiny()
    src, dst = tmp_path / "half.pth", tmp_path / "out.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in train.state_dict().items()}, src)
    proc = run_cli(src, dst, "--json", tmp_path / "r.json", "--rtol", "1e-30")
    assert proc.returncode == 1 and not dst.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("error: verification failed")
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    proc = ok(run_cli(src, dst))
    assert "(tolerance 1e-10, default, any dtype) ok" in proc.stdout
    assert "16 of 16 written tensors are the float64 fusion rounded once to float16: ok" in proc.stdout
    assert load(dst)["stem.reparam.weight"].dtype == torch.float16


def test_force_overwrites_and_no_verify_skips(tmp_path):
    train = tiny()
    src, dst = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(train.state_dict(), src)
    dst.write_bytes(b"old")
    proc = ok(run_cli(src, dst, "--force", "--no-verify", "--quiet", "--json", "-"))
    report = json.loads(proc.stdout)
    assert report["max_rel"] is None and report["verify_seconds"] == 0
    assert_deploy_equivalent(train, load(dst))


def run_cli(*args, script: bool = False):
    """``repvgg-convert``: the console script installed beside this interpreter, or the module."""
    return run_command("repvgg-convert" if script else "repvgg_tools.cli.convert", *args)
