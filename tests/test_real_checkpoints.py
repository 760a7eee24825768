"""The training files people really have, through the real ``repvgg-convert`` process: the official repo's
``main.py`` (yacs ``CfgNode``), mmengine/MMPretrain (``message_hub`` of ``HistoryBuffer``), timm's ``train.py``
(``argparse.Namespace`` args + ``state_dict_ema``); and pickles that try to run code."""

import os
import subprocess

import pytest
import torch
from cli_helpers import run_convert as run_cli
from convert_helpers import OURS, assert_deploy_equivalent, tiny
from real_files import RunsCode, mmengine_checkpoint, official_main_checkpoint, timm_train_checkpoint

from repvgg_tools.conversion.layouts import LAYOUTS, rename_layout
from repvgg_tools.io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint


def as_layout(model, layout: str) -> dict:
    return rename_layout(model.state_dict(), OURS, LAYOUTS[layout])


def converted(path) -> dict:
    """The written file, read as a user's ``torch.load(weights_only=True)`` would: plain data only."""
    return torch.load(path, weights_only=True)


def test_official_main_py_checkpoint(tmp_path):
    train, ema = tiny(0), tiny(1)
    src, dst = tmp_path / "latest.pth", tmp_path / "deploy.pth"
    official_main_checkpoint(src, as_layout(train, "official"), ema_sd=as_layout(ema, "official"))
    with pytest.raises(Exception, match="Weights only load failed"):  # what users hit with torch.load
        torch.load(src, weights_only=True)
    proc = run_cli(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert "read as data: yacs.config.CfgNode" in proc.stdout
    out = converted(dst)
    assert out["config"]["MODEL"]["ARCH"] == "RepVGG-A0" and out["epoch"] == 119  # carried, as plain dicts
    assert "optimizer" not in out and "lr_scheduler" not in out
    assert_deploy_equivalent(train, out["model"], "official")
    proc = run_cli(src, tmp_path / "ema.pth", "--ema")
    assert proc.returncode == 0, proc.stderr
    assert_deploy_equivalent(ema, converted(tmp_path / "ema.pth")["state_dict"], "official")


def test_mmengine_checkpoint(tmp_path):
    train = tiny(2)
    src, dst = tmp_path / "epoch_2.pth", tmp_path / "deploy.pth"
    mmengine_checkpoint(src, as_layout(train, "mmpretrain"))
    proc = run_cli(src, dst, "--json", tmp_path / "report.json")
    assert proc.returncode == 0, proc.stderr
    out = converted(dst)
    hub = out["message_hub"]
    buffer = hub["log_scalars"]["train/loss"]
    assert buffer["__class__"] == "mmengine.logging.history_buffer.HistoryBuffer"
    assert buffer["_log_history"] == [2.3, 2.1] and buffer["_count_history"] == [1, 2]  # NumPy arrays as lists
    assert hub["runtime_info"]["best_score"] == 0.71  # a NumPy scalar as a number
    assert "param_schedulers" not in out and out["meta"]["seed"] == 42
    assert_deploy_equivalent(train, out["state_dict"], "mmpretrain")
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert "mmengine.logging.history_buffer.HistoryBuffer" in report["replaced"]


def test_timm_train_py_checkpoint(tmp_path):
    train, ema = tiny(3), tiny(4)
    src = tmp_path / "last.pth.tar"
    timm_train_checkpoint(src, as_layout(train, "timm"), as_layout(ema, "timm"), "repvgg_custom")
    for args, model in (((), train), (("--ema",), ema)):
        dst = tmp_path / f"deploy{len(args)}.pth"
        proc = run_cli(src, dst, *args)
        assert proc.returncode == 0, proc.stderr
        out = converted(dst)
        assert out["args"]["model"] == "repvgg_custom" and out["args"]["__class__"] == "argparse.Namespace"
        assert out["metric"] == 0.42
        assert_deploy_equivalent(model, out["state_dict"], "timm")


def test_timm_args_name_the_architecture(tmp_path):
    """timm saves arch="byobnet" (the class) and the model's name in args.model: the name is what resolves."""
    from repvgg_tools import create_model, randomize_batchnorm
    from repvgg_tools.conversion.arch import checkpoint_hints

    assert checkpoint_hints({"arch": "byobnet", "args": {"model": "repvgg_a0"}}).arch == "repvgg_a0"
    assert checkpoint_hints({"config": {"MODEL": {"ARCH": "RepVGG-B1g2"}}}).arch == "RepVGG-B1g2"
    model = randomize_batchnorm(create_model("repvgg_a0", num_classes=7), 5).eval()
    src = tmp_path / "a0.pth.tar"
    timm_train_checkpoint(src, as_layout(model, "timm"), as_layout(model, "timm"), "repvgg_a0")
    proc = run_cli(src, tmp_path / "out.pth")
    assert proc.returncode == 0, proc.stderr
    assert "arch:        repvgg_a0" in proc.stdout


@pytest.mark.parametrize("target, names", [
    ((os.system, "touch {marker}"), "system"),
    ((exec, "open({marker!r}, 'w').close()"), "exec"),
    ((eval, "open({marker!r}, 'w').close()"), "eval"),
    ((subprocess.check_output, ["touch", "{marker}"]), "subprocess.check_output"),
])
def test_code_running_pickles_are_refused_and_never_run(tmp_path, target, names):
    marker = tmp_path / "PWNED"
    fn, arg = target
    arg = [a.format(marker=str(marker)) for a in arg] if isinstance(arg, list) else arg.format(marker=str(marker))
    src = tmp_path / "evil.pth"
    # next to a CfgNode-like config, so the file takes the restricted path a real training file takes
    torch.save({"state_dict": tiny().state_dict(), "args": __import__("argparse").Namespace(lr=1),
                "hook": RunsCode(fn, arg)}, src)
    before = src.read_bytes()
    proc = run_cli(src, tmp_path / "out.pth")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0] and names in lines[0]
    assert not marker.exists() and not (tmp_path / "out.pth").exists() and src.read_bytes() == before
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(src)
    assert not marker.exists()


def test_a_referenced_function_is_inert_but_a_call_is_refused(tmp_path):
    """A config may hold a function as a value (``act_layer=torch.nn.functional.relu``): kept as its name. Calling a
    non-allowlisted function while loading is refused, naming it."""
    src = tmp_path / "ref.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cfg": {"act": torch.nn.functional.relu}}, src)
    contents = read_checkpoint(src)
    assert contents.extras["cfg"]["act"] == {"__global__": "torch.nn.functional.relu"}
    assert "torch.nn.functional.relu" in contents.replaced
    called = tmp_path / "called.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": RunsCode(torch.nn.functional.relu, torch.ones(1))}, called)
    with pytest.raises(CheckpointError, match="calls torch.nn.functional.relu"):
        read_checkpoint(called)


def test_a_whole_pickled_model_reads_as_its_state_dict(tmp_path):
    """YOLOv6 and older scripts save model objects (``torch.save(model)``): read as the module's state dict."""
    model = tiny(6)
    path = tmp_path / "whole.pt"
    torch.save({"model": model, "epoch": 3}, path)
    contents = read_checkpoint(path)
    assert contents.container_key == "model" and "repvgg_tools.models.repvgg.RepVGG" in contents.replaced
    reference = model.state_dict()
    assert set(contents.state_dict) == set(reference)
    assert all(torch.equal(contents.state_dict[k], v) for k, v in reference.items())


def test_official_repvggplus_checkpoint(tmp_path):
    """RepVGGplus (official ``repvggplus.py``): SE after the ReLU, stage 3 in two, auxiliary heads in training form.
    Converts to the official deploy form: blocks fused, SE carried, auxiliary heads dropped, verified."""
    from repvggplus_model import TinyRepVGGplus

    from repvgg_tools import randomize_batchnorm, verify_equivalence

    torch.manual_seed(12)
    train = randomize_batchnorm(TinyRepVGGplus(), 12).eval()
    src, dst = tmp_path / "plus.pth", tmp_path / "plus_deploy.pth"
    official_main_checkpoint(src, train.state_dict(), arch="RepVGGplus-L2pse")
    proc = run_cli(src, dst)
    assert proc.returncode == 0, proc.stderr
    assert "layout:      repvggplus" in proc.stdout and "auxiliary classifiers" in proc.stdout
    assert "verify:      blocks, float64" in proc.stdout
    deploy = TinyRepVGGplus(deploy=True).eval()
    deploy.load_state_dict(converted(dst)["model"], strict=True)
    assert verify_equivalence(train, deploy, (2, 3, 64, 64)).passed
