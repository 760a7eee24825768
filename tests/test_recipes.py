"""Recipes: every file parses into valid options with the paper's values; overrides; clear errors; transforms."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repvgg_tools.training import RecipeError, apply_overrides, default_recipe, load_recipe, validate_recipe
from repvgg_tools.training.build import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_every_recipe_is_listed_and_parses():
    names = {p.name for p in RECIPES}
    assert {"repvgg_imagenet_120e.yaml", "repvgg_imagenet_200e_aug.yaml", "vgg16_paper.yaml",
            "digits_quickstart.yaml"} <= names
    for path in RECIPES:
        recipe = load_recipe(path)
        assert validate_recipe(recipe) == recipe  # a full recipe is a fixed point of validation
        from repvgg_tools.models import is_model

        assert is_model(recipe["model"]["arch"]), path


def test_recipes_directory_and_docs_name_the_same_recipes():
    """docs/train.md's recipe table names every recipes/*.yaml, and names no recipe that does not exist."""

    documented = set(re.findall(r"`(?:recipes/)?([A-Za-z0-9_.-]+\.yaml)`", (ROOT / "docs/train.md").read_text()))
    documented.discard("NAME.yaml")  # the usage line's placeholder
    on_disk = {p.name for p in RECIPES}
    assert on_disk - documented == set(), "recipes not named in docs/train.md"
    assert documented - on_disk == set(), "docs/train.md names recipes that are not in recipes/"


def test_paper_values():
    r = load_recipe(ROOT / "recipes/repvgg_imagenet_120e.yaml")
    assert (r["epochs"], r["batch_size"], r["optim"]["lr"], r["optim"]["weight_decay"], r["optim"]["momentum"]) == (
        120, 256, 0.1, 1e-4, 0.9)
    assert r["optim"]["opt"] == "momentum" and r["sched"]["name"] == "cosine" and r["aug"]["train_crop"] == "rrc"
    assert r["aug"]["hflip"] == 0.5 and r["aug"]["mixup"] == 0 and r["aug"]["auto_augment"] is None
    r = load_recipe(ROOT / "recipes/repvgg_imagenet_200e_aug.yaml")
    assert r["epochs"] == 200 and r["aug"]["auto_augment"] == "original" and r["aug"]["label_smoothing"] == 0.1
    assert r["aug"]["mixup"] > 0 and r["optim"]["lr"] == 0.1 and r["sched"]["name"] == "cosine"
    r = load_recipe(ROOT / "recipes/vgg16_paper.yaml")
    assert (r["optim"]["lr"], r["optim"]["momentum"], r["optim"]["weight_decay"], r["batch_size"]) == (
        0.01, 0.9, 5e-4, 256)
    assert r["model"]["arch"] == "vgg16" and r["model"]["kwargs"] == {"dropout": 0.5}
    assert r["sched"]["name"] == "plateau" and r["sched"]["decay_rate"] == 0.1
    assert r["aug"]["train_crop"] == "scale_jitter" and r["aug"]["scale_jitter"] == [256, 512]
    assert r["data"]["image_size"] == 224


def test_overrides_types_and_nesting():
    r = load_recipe(ROOT / "recipes/repvgg_imagenet_120e.yaml",
                    ["epochs=2", "model.arch=repvgg_b0", "optim.lr=5e-2", "ema.enabled=true", "aug.scale=[0.5, 1]",
                     "model.kwargs={use_1x1: false}", "resume=null", "amp=bf16"])
    assert r["epochs"] == 2 and r["model"]["arch"] == "repvgg_b0" and r["optim"]["lr"] == 0.05
    assert r["ema"]["enabled"] is True and r["aug"]["scale"] == [0.5, 1] and r["amp"] == "bf16"
    assert r["model"]["kwargs"] == {"use_1x1": False} and r["resume"] is None
    assert isinstance(r["optim"]["weight_decay"], float)  # "1.0e-4" from YAML stays a float
    base = default_recipe()
    assert apply_overrides(base, []) == base and base["epochs"] == 120  # overrides never modify their input
    apply_overrides(base, ["epochs=3"])
    assert base["epochs"] == 120


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown recipe key 'optim.lrr' (did you mean 'lr'?)"),
    ("epoch=3", "did you mean 'epochs'?"),
    ("epochs=abc", "'epochs' must be int"),
    ("amp=fp8", "'amp' must be one of none, bf16, fp16"),
    ("sched.name=linear", "'sched.name' must be one of"),
    ("epochs", "must look like key=value"),
    ("optim=3", "names a section"),
    ("epochs=0", "'epochs' must be >= 1"),
    ("aug.scale=[1.0, 0.5]", "'aug.scale' must be [min, max]"),
    ("ema.enabled=maybe", "'ema.enabled' must be bool"),
    ("seed=null", "'seed' may not be null"),
])
def test_bad_overrides(override, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(ROOT / "recipes/digits_quickstart.yaml", [override])
    assert message in str(err.value)


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: unknown recipe key 'optim.learning_rate'"):
        load_recipe(bad)
    bad.write_text("epochs: [3\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_cli_reports_bad_key_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "repvgg_tools.cli.train", "--recipe", "recipes/vgg16_paper.yaml",
                           "optim.lrr=3", f"output={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown recipe key 'optim.lrr' (did you mean 'lr'?); known keys: custom_l2, lr, momentum, opt, "
        "weight_decay"]
    assert not (tmp_path / "x").exists()


def test_vgg_plateau_schedule_divides_lr_by_ten():
    r = load_recipe(ROOT / "recipes/vgg16_paper.yaml")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(r, model)
    sched = build_scheduler(r, opt, steps_per_epoch=10)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 5e-4}  # BN and bias undecayed
    sched.step(1, 50.0)  # improvement
    for epoch in range(2, 2 + r["sched"]["patience"]):
        sched.step(epoch, 50.0)  # no improvement for `patience` epochs: still 0.01
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    sched.step(10, 50.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)


def test_cosine_schedule_from_point_one_to_zero():
    r = load_recipe(ROOT / "recipes/repvgg_imagenet_120e.yaml")
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(r, model)
    sched = build_scheduler(r, opt, steps_per_epoch=100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    sched.step_update(num_updates=60 * 100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05, rel=1e-6)  # half-way down the cosine
    sched.step_update(num_updates=120 * 100)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_train_transforms():
    from PIL import Image

    from repvgg_tools.data import eval_transform, train_transform

    img = Image.fromarray((torch.rand(300, 400, 3) * 255).byte().numpy())
    for path in RECIPES:
        r = load_recipe(path)
        if r["data"]["name"] != "imagefolder":
            continue
        a = r["aug"]
        tf = train_transform(r["data"]["image_size"], a["train_crop"], a["scale"], a["scale_jitter"], a["hflip"],
                             a["color_jitter"], a["auto_augment"])
        assert tf(img).shape == (3, 224, 224), path
    assert eval_transform(224, 256)(img).shape == (3, 224, 224)
    # scale jitter draws the shorter side from [256, 512]: crops of one image differ across draws
    tf = train_transform(64, "scale_jitter", scale_jitter=(64, 128), hflip=0.0)
    torch.manual_seed(0)
    outs = [tf(img) for _ in range(4)]
    assert all(o.shape == (3, 64, 64) for o in outs) and not torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="smaller than the crop"):
        train_transform(224, "scale_jitter", scale_jitter=(128, 256))
