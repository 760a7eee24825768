"""Training: exact resume, EMA, the custom L2 gradient, parameter groups, and a 2-process torchrun (gloo) run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repvgg_tools import randomize_batchnorm
from repvgg_tools.blocks import RepVGGBlock
from repvgg_tools.io.checkpoint import load_checkpoint, save_checkpoint
from repvgg_tools.training import custom_l2, load_recipe, param_groups, train

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "digits_quickstart.yaml"
# tiny: 16x16 digits, 2 steps of 16 images per epoch, a 5% validation split
TINY = ["data.image_size=16", "batch_size=16", "max_steps_per_epoch=2", "data.val_fraction=0.05", "progress=false"]


def _run(tmp: Path, name: str, *overrides: str) -> dict:
    return train(load_recipe(QUICK, [*TINY, f"output={tmp / name}", *overrides]))


def _same(a: dict, b: dict, floats_only: bool = False) -> bool:
    keys = [k for k in a if not floats_only or a[k].is_floating_point()]
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in keys)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    # EMA, mixup + label smoothing (NumPy/Python RNG), custom L2 and a per-step cosine with warmup all take part
    extra = ["epochs=2", "ema.enabled=true", "ema.decay=0.9", "aug.mixup=0.2", "aug.label_smoothing=0.1",
             "optim.custom_l2=true"]
    _run(tmp_path, "full", *extra)
    _run(tmp_path, "split", *extra, "stop_after=1")
    first = load_checkpoint(tmp_path / "split" / "last.pth")
    assert first["epoch"] == 0 and first["step"] == 2
    _run(tmp_path, "split", *extra, f"resume={tmp_path / 'split' / 'last.pth'}")
    full, split = load_checkpoint(tmp_path / "full" / "last.pth"), load_checkpoint(tmp_path / "split" / "last.pth")
    assert split["epoch"] == full["epoch"] == 1 and split["step"] == full["step"] == 4
    assert not _same(first["state_dict"], full["state_dict"])  # training moved the weights
    assert _same(full["state_dict"], split["state_dict"])
    assert _same(full["state_dict_ema"], split["state_dict_ema"])
    assert _same(full["optimizer"]["state"][0], split["optimizer"]["state"][0])
    assert full["optimizer"]["param_groups"][0]["lr"] == split["optimizer"]["param_groups"][0]["lr"]
    with open(tmp_path / "split" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [r["val_top1"] for r in rows] == [str(m["val_top1"]) for m in full["metrics"]]
    assert (tmp_path / "split" / "metrics.png").stat().st_size > 0
    # what repvgg-convert needs, without flags
    assert (full["arch"], full["num_classes"], full["layout"]) == ("repvgg_a0", 10, "ours")


def test_ema_tracks_the_model(tmp_path):
    # decay 0: the EMA is a copy of the model after every step
    one = _run(tmp_path, "one", "epochs=1", "max_steps_per_epoch=1", "sched.name=none", "ema.enabled=true",
               "ema.decay=0.0")
    ckpt = load_checkpoint(tmp_path / "one" / "last.pth")
    assert _same(ckpt["state_dict"], ckpt["state_dict_ema"])
    assert "ema_top1" in one["last"]
    # decay 1: the first update copies (timm's step-based decay), later updates change nothing, so after three
    # steps the EMA still holds the weights after step one, and the model has moved on
    _run(tmp_path, "three", "epochs=1", "max_steps_per_epoch=3", "sched.name=none", "ema.enabled=true",
         "ema.decay=1.0")
    three = load_checkpoint(tmp_path / "three" / "last.pth")
    assert _same(three["state_dict_ema"], ckpt["state_dict"], floats_only=True)
    assert not _same(three["state_dict"], ckpt["state_dict"], floats_only=True)


def _manual_fused_kernel(block: RepVGGBlock, w3, g3, w1, g1, gid) -> torch.Tensor:
    """The equivalent 3x3 kernel written out by hand in float64 (independent of fusion.py)."""
    def scale(bn, gamma):
        return (gamma / torch.sqrt(bn.running_var.double() + bn.eps)).reshape(-1, 1, 1, 1)

    k = w3 * scale(block.branch_3x3.bn, g3)
    if w1 is not None:
        k = k + torch.nn.functional.pad(w1 * scale(block.branch_1x1.bn, g1), (1, 1, 1, 1))
    if gid is not None:
        eye = torch.zeros_like(k)
        per_group = block.in_ch // block.groups
        for i in range(block.out_ch):
            eye[i, i % per_group, 1, 1] = 1.0
        k = k + eye * scale(block.branch_identity, gid)
    return k


@pytest.mark.parametrize("in_ch, out_ch, stride, groups", [(4, 4, 1, 1), (4, 6, 2, 1), (4, 4, 1, 2)])
def test_custom_l2_gradient_is_the_gradient_of_the_fused_kernel_norm(in_ch, out_ch, stride, groups):
    block = randomize_batchnorm(RepVGGBlock(in_ch, out_ch, stride, groups), seed=3)
    loss = custom_l2(block)
    loss.backward()
    # reference: float64 leaves, the fusion written by hand, autograd on sum(K^2)
    w3 = block.branch_3x3.conv.weight.detach().double().requires_grad_()
    g3 = block.branch_3x3.bn.weight.detach().double().requires_grad_()
    w1 = block.branch_1x1.conv.weight.detach().double().requires_grad_()
    g1 = block.branch_1x1.bn.weight.detach().double().requires_grad_()
    has_id = block.branch_identity is not None
    gid = block.branch_identity.weight.detach().double().requires_grad_() if has_id else None
    ref = _manual_fused_kernel(block, w3, g3, w1, g1, gid).pow(2).sum()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    ref.backward()
    pairs = [(block.branch_3x3.conv.weight, w3), (block.branch_3x3.bn.weight, g3),
             (block.branch_1x1.conv.weight, w1), (block.branch_1x1.bn.weight, g1)]
    if has_id:
        pairs.append((block.branch_identity.weight, gid))
    for param, leaf in pairs:
        torch.testing.assert_close(param.grad.double(), leaf.grad, rtol=1e-5, atol=1e-7)
    # and a central finite difference on one branch weight, in float64
    block64 = block.double()
    with torch.no_grad():
        w = block64.branch_1x1.conv.weight
        h, idx = 1e-6, (0, 0, 0, 0)
        w[idx] += h
        up = block64.kernel_bias()[0].pow(2).sum()
        w[idx] -= 2 * h
        down = block64.kernel_bias()[0].pow(2).sum()
        w[idx] += h
    assert ((up - down) / (2 * h)).item() == pytest.approx(w1.grad[idx].item(), rel=1e-5)


def test_param_groups_exclude_bn_and_bias_and_custom_l2_kernels():
    from repvgg_tools import create_model

    model = create_model("repvgg_a0", num_classes=10)
    by_id = {id(p): n for n, p in model.named_parameters()}

    def names(groups, decayed):
        return {by_id[id(p)] for g in groups if (g["weight_decay"] > 0) == decayed for p in g["params"]}

    plain = param_groups(model, 1e-4)
    decayed = names(plain, True)
    assert decayed and all(n.endswith(".weight") and "bn" not in n and "identity" not in n for n in decayed)
    assert "head.fc.weight" in decayed and "stem.branch_3x3.conv.weight" in decayed
    assert {"head.fc.bias", "stem.branch_3x3.bn.weight", "stages.0.1.branch_identity.weight"} <= names(plain, False)
    custom = param_groups(model, 1e-4, custom_l2_enabled=True)
    assert names(custom, True) == {"head.fc.weight"}  # branch kernels are regularized by the custom L2 instead
    assert sum(len(g["params"]) for g in custom) == len(list(model.parameters()))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # tools/train.py: a checkout
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "tools/train.py",
           "--recipe", str(QUICK), *TINY, "epochs=1", "max_steps_per_epoch=3", f"output={out}", "device=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == 3
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # ranks draw different randomness
    assert ckpt["metrics"][-1]["train_images"] == 2 * 3 * 8  # both ranks' batches of 16 / 2 were counted
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    assert "done: best val top-1" in proc.stdout

    # the same output again: refused in one line, nothing overwritten
    before = (out / "last.pth").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "tools/train.py", "--recipe", str(QUICK), *TINY, f"output={out}"],
                           cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and again.stderr.startswith("error: output=") and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1 and (out / "last.pth").stat().st_mtime_ns == before

    # resuming from weights alone (no optimizer state) is refused with a clear message
    bare = tmp_path / "bare.pth"
    save_checkpoint(ckpt["state_dict"], bare)
    bad = subprocess.run([sys.executable, "tools/train.py", "--recipe", str(QUICK), *TINY, f"output={tmp_path / 'r'}",
                          f"resume={bare}"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "not a training checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_qat_recipe_fuses_fake_quantizes_and_saves_scales(tmp_path):
    """quant.qat: the deploy form is fine-tuned with fake quantization; the checkpoint holds a plain deploy state
    dict and the scales (tests/test_int8.py exports them and checks the accuracy)."""
    from repvgg_tools import create_model, save_checkpoint
    from repvgg_tools.training import RecipeError
    from repvgg_tools.training.qat import QAT_FORMAT

    init = tmp_path / "init.pth"
    save_checkpoint({"state_dict": create_model("repvgg_a0", num_classes=10).state_dict(), "arch": "repvgg_a0"}, init)
    qat = [*TINY, "epochs=1", "max_steps_per_epoch=1", "data.workers=0", "quant.qat=true", f"quant.init={init}",
           "quant.calib_samples=8"]
    result = _run(tmp_path, "qat", *qat)
    assert "val_top1" in result["last"]
    ckpt = load_checkpoint(tmp_path / "qat" / "last.pth")
    quant, sd = ckpt["quant"], ckpt["state_dict"]
    assert quant["format"] == QAT_FORMAT and len(quant["activation_scales"]) == len(quant["weight_scales"]) == 23
    assert "stem.reparam.weight" in sd and not any("branch" in k or "_fq." in k for k in sd)  # fused, plain keys
    assert quant["weight_scales"]["stem.reparam"].shape == (48,)
    with pytest.raises(RecipeError, match="quant.init"):
        load_recipe(QUICK, ["quant.qat=true"])
    with pytest.raises(RecipeError, match="does not support ema.enabled"):
        load_recipe(QUICK, [*qat, "ema.enabled=true"])
