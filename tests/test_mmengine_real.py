"""A training file written by the real mmengine ``Runner`` (what MMPretrain 1.x training saves), through the real
``repvgg-convert`` process and :func:`repvgg_tools.load_model`.

tests/mmengine_runner_file.py writes the file in a subprocess (so this process never imports mmengine): one epoch
of two iterations of our ``repvgg_a0`` under MMPretrain's parameter names, SGD with a LinearLR warm-up and a
CosineAnnealingLR, then the Runner's own CheckpointHook. Its ``message_hub`` holds ``HistoryBuffer`` objects whose
pickle calls ``getattr(HistoryBuffer, 'min')`` (the ``statistics_methods`` their ``__getstate__`` adds) and NumPy's
``_reconstruct``; ``runtime_info['eta']`` is a NumPy scalar.
"""

import importlib.util
import os
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from cli_helpers import run_convert
from mmengine_runner_file import INPUT_SHAPE, MMPretrainLayoutModel

from repvgg_tools import create_model, load_model
from repvgg_tools.io.checkpoint import read_checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
PLAIN = (dict, list, tuple, str, int, float, bool, type(None), torch.Tensor)

# mmengine is in the dev extra that `make test` installs: missing, this module fails to collect (not a silent skip).
# find_spec, not an import: this process never imports mmengine
if importlib.util.find_spec("mmengine") is None:
    raise ImportError("mmengine is not installed (it is in the dev extra: pip install -e '.[dev]')")


def subprocess_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": ""}



def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def as_lists(value):
    """Tuples as lists, all the way down (the reference holds lists)."""
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_lists(v) for v in value]
    return value


def not_plain(value, where: str = "") -> list[str]:
    """Paths of the values that are not plain data (what ``weights_only=True`` and JSON know)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in (not_plain(k, where) if not isinstance(k, str | int) else [])
                + not_plain(v, f"{where}/{k}")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in not_plain(v, f"{where}/{i}")]
    return [] if isinstance(value, PLAIN) else [f"{where}: {type(value).__module__}.{type(value).__qualname__}"]


@pytest.fixture(scope="module")
def runner_file(tmp_path_factory):
    """``(epoch_1.pth, reference)``: the Runner's file and what the Runner held (plain data)."""
    out = tmp_path_factory.mktemp("mmengine_runner")
    proc = subprocess.run([sys.executable, str(HERE / "mmengine_runner_file.py"), str(out)], capture_output=True,
                          text=True, timeout=600, cwd=out, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "work_dir" / "epoch_1.pth", torch.load(out / "reference.pth", weights_only=True)


@pytest.fixture(scope="module")
def conversion(runner_file, tmp_path_factory):
    """``repvgg-convert epoch_1.pth deploy.pth --json report.json``, run once: ``(process, deploy.pth, report)``."""
    src, _ = runner_file
    out = tmp_path_factory.mktemp("mmengine_deploy")
    dst, report = out / "deploy.pth", out / "report.json"
    return run_cli(src, dst, "--json", report), dst, report


@pytest.fixture(scope="module")
def train_model(runner_file):
    """Our training-form model holding the Runner's weights (from the reference, not through the reader)."""
    _, ref = runner_file
    model = create_model(ref["arch"], num_classes=ref["num_classes"])
    model.load_state_dict(ref["train_state_dict"], strict=True)
    return model.eval()


def pickle_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}


def test_the_file_is_what_the_runner_writes(runner_file, train_model):
    """The fixture itself (holds today): MMPretrain's keys and names, the globals that make the file hard to read,
    and a wrapper whose forward is our model's."""
    src, ref = runner_file
    names = ref["param_names"]
    assert {"backbone.stem.branch_3x3.conv.weight", "backbone.stem.branch_3x3.norm.running_var",
            "backbone.stem.branch_1x1.conv.weight", "backbone.stem.branch_1x1.norm.bias",
            "backbone.stage_1.0.branch_3x3.norm.weight", "backbone.stage_1.1.branch_norm.running_mean",
            "backbone.stage_4.0.branch_1x1.conv.weight", "head.fc.weight", "head.fc.bias"} <= set(names)
    assert all(k.startswith(("backbone.stem.", "backbone.stage_", "head.fc.")) for k in names)
    found = pickle_globals(src)
    assert {"mmengine.logging.history_buffer HistoryBuffer", "__builtin__ getattr", "numpy dtype"} <= found
    assert any(g.endswith("multiarray _reconstruct") for g in found)
    with pytest.raises(Exception, match="Weights only load failed"):  # what users hit with torch.load
        torch.load(src, weights_only=True)
    with torch.no_grad():
        assert rel_err(train_model(ref["input"]), ref["output"]) < 1e-6
    stem_var = ref["train_state_dict"]["stem.branch_3x3.bn.running_var"]
    assert not torch.allclose(stem_var, torch.ones_like(stem_var), atol=0.1)  # randomized before the save


def test_repvgg_convert_converts_and_verifies(conversion):
    proc, dst, report_path = conversion
    assert proc.returncode == 0, proc.stderr
    assert "layout:      mmpretrain" in proc.stdout
    assert "verify:      " in proc.stdout and " ok in " in proc.stdout, proc.stdout
    import json

    report = json.loads(report_path.read_text())
    assert report["passed"] and report["max_rel"] < 1e-5 and report["blocks_fused"] == 22
    assert HISTORY_BUFFER in report["replaced"]
    assert dst.is_file()


def test_load_model_and_the_mmpretrain_deploy_layout(runner_file, conversion, train_model):
    src, ref = runner_file
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = train_model(x)

    model, info = load_model(src)
    assert info["layout"] == "mmpretrain" and info["num_classes"] == ref["num_classes"]
    with torch.no_grad():
        assert rel_err(model.eval()(x), expected) < 1e-5

    proc, dst, _ = conversion
    assert proc.returncode == 0, proc.stderr
    sd = torch.load(dst, weights_only=True)["state_dict"]
    assert {"backbone.stem.branch_reparam.weight", "backbone.stem.branch_reparam.bias",
            "backbone.stage_1.0.branch_reparam.weight", "backbone.stage_4.0.branch_reparam.bias",
            "head.fc.weight", "head.fc.bias"} <= set(sd)
    training = [k for k in sd if any(p in k for p in ("branch_3x3", "branch_1x1", "branch_norm", "running_"))]
    assert not training, training[:5]
    deploy = MMPretrainLayoutModel(create_model(ref["arch"], num_classes=ref["num_classes"], deploy=True))
    deploy.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert rel_err(deploy.eval()(x), expected) < 1e-5


def test_meta_and_message_hub_come_through_as_plain_data(runner_file, conversion):
    src, ref = runner_file
    proc, dst, _ = conversion
    assert proc.returncode == 0, proc.stderr
    out = torch.load(dst, weights_only=True)
    assert "optimizer" not in out and "param_schedulers" not in out  # training state is dropped
    assert not not_plain(out), not_plain(out)[:5]

    meta = out["meta"]
    assert "type='RepVGGToolsClassifier'" in meta["cfg"] and "CosineAnnealingLR" in meta["cfg"]
    assert meta["seed"] == 0 and meta["epoch"] == 1 and meta["iter"] == 2
    assert meta["mmengine_version"].startswith("0.")
    assert as_lists(meta["dataset_meta"]["classes"]) == [f"class_{i}" for i in range(ref["num_classes"])]

    hub = out["message_hub"]
    assert set(hub["log_scalars"]) == set(ref["log_scalars"]) >= {"train/loss", "train/lr"}
    for key, expected in ref["log_scalars"].items():
        buffer = hub["log_scalars"][key]
        assert buffer["__class__"] == HISTORY_BUFFER
        assert buffer["_log_history"] == pytest.approx(expected["log_history"])  # NumPy arrays as lists
        assert buffer["_count_history"] == expected["count_history"]
    # the checkpoint is written inside the training loop, the reference after it (which pops 'loop_stage')
    info = as_lists(hub["runtime_info"])
    assert info.pop("loop_stage") == "train"
    assert info == {k: v for k, v in ref["runtime_info"].items() if k != "loop_stage"}  # NumPy scalar 'eta' a number
    assert type(hub["runtime_info"]["eta"]) is float
    assert all(hub["resumed_keys"].values())


def test_the_output_reads_without_mmengine(conversion):
    """In a process where ``import mmengine`` fails: ``torch.load(weights_only=True)`` and our reader read the
    converted file, and our reader finds nothing it has to replace."""
    proc, dst, _ = conversion
    assert proc.returncode == 0, proc.stderr
    code = ("import sys; sys.modules['mmengine'] = None\n"
            "import torch\n"
            "from repvgg_tools.io.checkpoint import read_checkpoint\n"
            f"out = torch.load({str(dst)!r}, weights_only=True)\n"
            f"contents = read_checkpoint({str(dst)!r})\n"
            "assert not contents.replaced, contents.replaced\n"
            "assert contents.extras['message_hub']['log_scalars']['train/loss']['_log_history']\n"
            "print(len(contents.state_dict))\n")
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=subprocess_env())
    assert check.returncode == 0, check.stderr[-3000:]
    assert "mmengine" not in sys.modules  # nor was it imported here
    contents = read_checkpoint(dst)
    assert not contents.replaced


def run_cli(*args):
    return run_convert(*args, env=subprocess_env())
