"""Layouts and tensor-level conversion: key names checked against the real projects (timm installed here), every
layout converting to an equivalent deploy model, architecture inference, whole-model checkpoints, corrupt weights."""

import copy

import pytest
import torch
from convert_helpers import DEPTHS, OURS, Detector, assert_deploy_equivalent, tiny
from torch import nn

from repvgg_tools import create_model, randomize_batchnorm, reparameterize, verify_equivalence
from repvgg_tools.conversion.api import ConversionError, VerificationError, convert_state_dict, load_model
from repvgg_tools.conversion.arch import infer_repvgg_spec, state_dict_mismatch
from repvgg_tools.conversion.check import FUSION_RTOL
from repvgg_tools.conversion.layouts import LAYOUTS, detect_layout, find_blocks, rename_layout
from repvgg_tools.models import REPVGG_CONFIGS

# Key names as written in each project's source: DingXiaoH/RepVGG repvgg.py (rbr_dense/rbr_1x1/rbr_identity, stage0,
# linear, se.down/up), timm byobnet.py RepVggBlock (conv_kxk/conv_1x1/identity/attn.fc1/fc2, reparam_conv),
# MMPretrain backbones/repvgg.py (branch_3x3.{conv,norm}, branch_norm, se_layer.conv1.conv, branch_reparam).
EXPECTED = {
    "official": ["stage0.rbr_dense.conv.weight", "stage1.1.rbr_identity.running_var", "stage2.0.rbr_1x1.bn.bias",
                 "stage1.0.se.down.weight", "linear.weight"],
    "timm": ["stem.conv_kxk.conv.weight", "stages.0.1.identity.running_var", "stages.1.0.conv_1x1.bn.bias",
             "stages.0.0.attn.fc1.weight", "head.fc.weight"],
    "mmpretrain": ["backbone.stem.branch_3x3.conv.weight", "backbone.stage_1.1.branch_norm.running_var",
                   "backbone.stage_2.0.branch_1x1.norm.bias", "backbone.stage_1.0.se_layer.conv1.conv.weight",
                   "head.fc.weight"],
    "ours": ["stem.branch_3x3.conv.weight", "stages.0.1.branch_identity.running_var", "stages.1.0.branch_1x1.bn.bias",
             "stages.0.0.se.down.weight", "head.fc.weight"],
}
EXPECTED_DEPLOY = {"official": "stage4.0.rbr_reparam.weight", "timm": "stages.3.0.reparam_conv.weight",
                   "mmpretrain": "backbone.stage_4.0.branch_reparam.weight", "ours": "stages.3.0.reparam.weight"}


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_key_names_and_detection(layout):
    sd = rename_layout(tiny(se_ratio=0.25).state_dict(), OURS, LAYOUTS[layout])
    assert set(EXPECTED[layout]) <= set(sd)
    assert detect_layout(sd) == layout
    deploy, report = convert_state_dict(sd, verify=False)
    assert EXPECTED_DEPLOY[layout] in deploy and detect_layout(deploy) == layout
    assert report.layout == report.out_layout == layout


@pytest.mark.parametrize("src", ["ours", "official", "timm", "mmpretrain"])
@pytest.mark.parametrize("dst", [None, "ours", "official"])
def test_every_layout_converts_to_an_equivalent_model(src, dst):
    train = tiny(se_ratio=0.25 if src != "official" else 0.0)
    sd = rename_layout(train.state_dict(), OURS, LAYOUTS[src])
    deploy, report = convert_state_dict(sd, out_layout=dst)
    assert report.verify_mode == "model" and report.passed and report.max_rel < 1e-5
    assert report.blocks_fused == sum(DEPTHS) and report.arch.startswith("custom RepVGG")
    assert_deploy_equivalent(train, deploy, dst or src, se_ratio=0.25 if src != "official" else 0.0)


def test_fusion_is_bit_identical_to_the_block_method():
    """The converter and RepVGGBlock.reparameterize go through the same fusion.py functions."""
    train = tiny(se_ratio=0.25)
    deploy, _ = convert_state_dict(train.state_dict(), verify=False)
    reference = reparameterize(train).state_dict()
    assert set(deploy) == set(reference)
    assert all(torch.equal(deploy[k], reference[k]) for k in deploy)


def test_input_untouched_unless_inplace():
    sd = tiny().state_dict()
    before = copy.deepcopy(sd)
    convert_state_dict(sd)
    assert all(torch.equal(sd[k], before[k]) for k in before) and list(sd) == list(before)
    convert_state_dict(sd, inplace=True, verify=False)
    assert not sd  # consumed


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b1g4", "repvgg_d2se"])
def test_timm_layout_matches_timm_models(name):
    import timm

    with torch.device("meta"):  # names and shapes only
        ours = create_model(name, num_classes=10).state_dict()
        theirs = timm.create_model(name, pretrained=False, num_classes=10).state_dict()
    assert {k: tuple(v.shape) for k, v in rename_layout(ours, OURS, LAYOUTS["timm"]).items()} == {
        k: tuple(v.shape) for k, v in theirs.items()}


def test_timm_deploy_layout_matches_timm():
    import timm  # noqa: F401
    from timm.utils.model import reparameterize_model

    deployed = reparameterize_model(_timm_tiny()).state_dict()
    ours_deploy = tiny(deploy=True, widths=(8, 8, 16, 32, 64), layer_groups={2: 2, 4: 2, 6: 2}, se_ratio=0.25)
    assert {k: tuple(v.shape) for k, v in rename_layout(ours_deploy.state_dict(), OURS, LAYOUTS["timm"]).items()} == {
        k: tuple(v.shape) for k, v in deployed.items()}


def _timm_tiny():
    from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg

    cfg = ByoModelCfg(blocks=_rep_vgg_bcfg(d=(2, 2, 2, 1), wf=(0.125,) * 4, groups=2), stem_type="rep", stem_chs=8,
                      attn_layer="se", attn_kwargs=dict(rd_ratio=0.25, rd_divisor=1))
    return ByobNet(cfg, num_classes=5)


@pytest.mark.parametrize("name", ["repvgg_a0", "tiny_groups_se"])
def test_timm_checkpoint_converts_into_timms_own_deploy_model(name):
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10) if name != "tiny_groups_se" else _timm_tiny()
    model = randomize_batchnorm(model, seed=3).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    deploy_sd, report = convert_state_dict(sd)
    assert report.layout == "timm" and report.passed
    if name == "repvgg_a0":
        assert report.arch == "repvgg_a0"
    target = reparameterize_model(copy.deepcopy(model))
    for p in target.parameters():
        nn.init.zeros_(p)  # nothing of timm's own fusion survives: every value comes from our checkpoint
    target.load_state_dict(deploy_sd, strict=True)
    result = verify_equivalence(model, target.eval(), (2, 3, 64, 64))
    assert result.passed, result


@pytest.mark.parametrize("name", sorted(REPVGG_CONFIGS))
def test_zoo_architectures_are_recognized_from_shapes(name):
    for deploy in (False, True):
        with torch.device("meta"):
            sd = create_model(name, num_classes=7, deploy=deploy).state_dict()
        spec = infer_repvgg_spec(sd)
        assert spec.name == name and spec.num_classes == 7


@pytest.mark.parametrize("kw", [
    {},
    {"widths": (16, 24, 40, 40, 72), "depths": (1, 3, 1, 2, 1), "layer_groups": {3: 4, 5: 8}},
    {"in_chans": 1, "num_classes": 0},
    {"use_1x1": False, "se_ratio": 0.5},
    {"widths": (8, 8, 16, 16, 32), "strides": (2, 1, 2, 2, 2), "output_stride": 16},
    {"use_identity": False},
])
def test_custom_architectures_are_inferred(kw):
    train = tiny(**kw)
    spec = infer_repvgg_spec(train.state_dict())
    assert spec.name is None and spec.describe().startswith("custom RepVGG")
    with torch.device("meta"):
        assert state_dict_mismatch(spec.build(), train.state_dict()) is None
    if "strides" in kw:
        assert spec.strides == kw["strides"]
    deploy, report = convert_state_dict(train.state_dict())
    assert report.verify_mode == "model" and report.passed
    assert_deploy_equivalent(train, deploy, "ours", **kw)


def test_whole_model_checkpoint_converts_blocks_and_carries_the_rest():
    torch.manual_seed(0)
    train = randomize_batchnorm(Detector(), seed=1).eval()
    sd = train.state_dict()
    deploy_sd, report = convert_state_dict(sd)
    assert report.verify_mode == "blocks" and report.passed and report.blocks_fused == sum(DEPTHS)
    others = [k for k in sd if not k.startswith("backbone.")]
    assert others and all(torch.equal(deploy_sd[k], sd[k]) for k in others)  # bit-identical, BN not folded
    deploy = Detector(deploy=True).eval()
    deploy.load_state_dict(deploy_sd, strict=True)
    assert verify_equivalence(train, deploy, (2, 3, 64, 64)).passed
    mm, _ = convert_state_dict(sd, out_layout="timm", verify=False)
    assert "backbone.body.stages.0.1.reparam_conv.weight" in mm and "rpn.head.1.running_var" in mm


def test_torchvision_style_vgg_sequential_folds_like_reparameterize():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    model.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 4))
    model = randomize_batchnorm(model, seed=2).eval()
    deploy_sd, report = convert_state_dict(model.state_dict())
    assert report.layout == "torchvision" and report.blocks_fused == 2 and report.passed
    reference = reparameterize(model)
    assert set(deploy_sd) == set(reference.state_dict())  # features.4 -> features.3, BNs gone
    reference.load_state_dict(deploy_sd, strict=True)
    assert verify_equivalence(model, reference, (2, 3, 8, 8)).passed


def _corrupt(sd, key, value):
    sd = dict(sd)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    return sd


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN or Inf"), ("inf", "NaN or Inf"), ("negative_var", "negative"), ("resnet", "no RepVGG blocks"),
    ("unknown_arch", "unknown arch"), ("wrong_arch", "do not fit --arch repvgg_a0"), ("extra_key", "unexpected key"),
    ("bad_shape", "shape"), ("unknown_layout", "unknown layout"),
])
def test_bad_weights_raise_conversion_errors(case, match):
    sd = tiny().state_dict()
    kwargs = {}
    if case == "nan":
        sd = _corrupt(sd, "stages.1.0.branch_1x1.conv.weight", float("nan"))
    elif case == "inf":
        sd = _corrupt(sd, "head.fc.weight", float("inf"))
    elif case == "negative_var":
        sd = _corrupt(sd, "stages.0.1.branch_identity.running_var", -0.5)
    elif case == "resnet":
        torchvision = pytest.importorskip("torchvision")
        sd = torchvision.models.resnet18(num_classes=10).state_dict()
    elif case == "unknown_arch":
        kwargs["arch"] = "repvgg_z9"
    elif case == "wrong_arch":
        kwargs["arch"] = "repvgg_a0"
    elif case == "extra_key":
        sd["stages.0.0.branch_3x3.scale"] = torch.ones(8)
    elif case == "bad_shape":
        sd["stages.0.0.branch_1x1.bn.running_mean"] = torch.zeros(9)
    elif case == "unknown_layout":
        kwargs["layout"] = "caffe"
    with pytest.raises(ConversionError, match=match) as info:
        convert_state_dict(sd, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_judged_on_its_float64_fusion(dtype):
    """One tolerance for every dtype: the fusion is float64 and exact; the rounding to the dtype is checked bit for
    bit, and the forward with the rounded weights (the dtype's rounding, amplified) is only reported."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tiny().state_dict().items()}
    deploy, report = convert_state_dict(sd)
    assert report.passed and report.rtol == FUSION_RTOL and report.rtol_source == "default, any dtype"
    assert deploy["stem.reparam.weight"].dtype == dtype
    assert report.max_rel < 1e-13 and not report.rounding_mismatches
    assert report.rounding_checked == 2 * report.blocks_fused
    assert 1e-5 < report.rounded_max_rel < 1e-1  # the rounding of the written weights: reported, not judged
    with pytest.raises(VerificationError) as info:  # an explicit tolerance is honoured
        convert_state_dict(sd, rtol=1e-30)
    assert info.value.report.rtol_source == "given"


@pytest.mark.parametrize("layout", ["ours", "official", "mmpretrain"])
def test_load_model_returns_our_deploy_model(tmp_path, layout):
    train = tiny()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": rename_layout(train.state_dict(), OURS, LAYOUTS[layout]), "epoch": 3}, path)
    model, info = load_model(path)
    assert not model.training and info["layout"] == layout and info["num_classes"] == 5
    assert not find_blocks(model.state_dict(), OURS)[0].keys.get("branch_3x3.conv.weight")
    assert verify_equivalence(train, model, (2, 3, 32, 32)).passed
    deploy_path = tmp_path / "deploy.pth"
    torch.save(model.state_dict(), deploy_path)
    again, info = load_model(deploy_path)
    assert info["deployed_input"] and verify_equivalence(train, again, (2, 3, 32, 32)).passed


def test_load_model_refuses_whole_model_checkpoints(tmp_path):
    path = tmp_path / "det.pth"
    torch.save(Detector().state_dict(), path)
    with pytest.raises(ConversionError, match="not a standalone"):
        load_model(path)
