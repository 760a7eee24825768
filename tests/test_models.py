"""The model zoo: every registered model converts exactly, has the paper's architecture and published sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from repvgg_tools import create_model, list_models, randomize_batchnorm, reparameterize
from repvgg_tools.blocks import RepVGGBlock, SEBlock
from repvgg_tools.verify import compare_outputs

ALL_MODELS = [n for n in list_models() if not n.startswith("qarepvgg_")]  # QARepVGG: tests/test_qarepvgg.py
REPVGG_MODELS = [n for n in ALL_MODELS if n.startswith("repvgg_")]
VGG_MODELS = [n for n in ALL_MODELS if n.startswith("vgg")]

# The paper's width multipliers (a, b) and depths, written out here independently of the package's tables.
DEPTHS = {"A": (1, 2, 4, 14, 1), "B": (1, 4, 6, 16, 1), "D": (1, 8, 14, 24, 1)}
PAPER = {
    "a0": ("A", 0.75, 2.5), "a1": ("A", 1.0, 2.5), "a2": ("A", 1.5, 2.75), "b0": ("B", 1.0, 2.5),
    "b1": ("B", 2.0, 4.0), "b2": ("B", 2.5, 5.0), "b3": ("B", 3.0, 5.0), "d2se": ("D", 2.5, 5.0),
}
# VGG paper configurations: conv kernel sizes of the feature stack, in order
VGG_KERNELS = {
    "vgg11": [3] * 8, "vgg11_lrn": [3] * 8, "vgg13": [3] * 10, "vgg16": [3] * 13, "vgg19": [3] * 16,
    "vgg16_c": [3, 3, 3, 3, 3, 3, 1, 3, 3, 1, 3, 3, 1],
}
# 64x64 leaves the last stage at 2x2 after the five stride-2 stages / max pools (32x downsampling): at 1x1 every
# 3x3 kernel's border taps multiply zero padding only, and a wrong border tap would go unseen
INPUT = (1, 3, 64, 64)  # one image: the fusion is per-pixel, a batch adds time and no coverage


def _blocks(model: nn.Module) -> list[RepVGGBlock]:
    """Every block in order: layer 0 is the stem."""
    return [model.stem, *(b for stage in model.stages for b in stage)]


def _paper(name: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    key = name[len("repvgg_"):]
    groups = 1
    for g in (2, 4):
        if key.endswith(f"g{g}"):
            key, groups = key[:-2], g
    family, a, b = PAPER[key]
    widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    return widths, DEPTHS[family], groups


def _assert_deploy_graph(name: str, model: nn.Module) -> None:
    """No BatchNorm anywhere; every body conv is 3x3 (paper exceptions: vgg16_c's 1x1 layers, D2se's SE)."""
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    se_convs = {id(c) for m in model.modules() if isinstance(m, SEBlock) for c in m.modules()}
    body = [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in se_convs]
    if name.startswith("repvgg_"):
        blocks = _blocks(model)
        assert [b.reparam for b in blocks] == body
        assert all(c.kernel_size == (3, 3) and c.bias is not None for c in body)
        assert len(body) == sum(_paper(name)[1])
        assert bool(se_convs) == (name == "repvgg_d2se")
    else:
        assert [c.kernel_size[0] for c in body] == VGG_KERNELS[name.removesuffix("_bn")]
        assert all(c.kernel_size[0] == c.kernel_size[1] and c.bias is not None for c in body)


def test_zoo_names():
    expected = {f"repvgg_{n}" for n in ("a0", "a1", "a2", "b0", "b1", "b1g2", "b1g4", "b2", "b2g2", "b2g4", "b3",
                                        "b3g2", "b3g4", "d2se")}
    expected |= {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")} | {"vgg11_lrn", "vgg16_c"}
    assert expected <= set(ALL_MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("repvgg_z9")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_training_vs_deploy_fp32(name):
    """Randomized BN, deploy vs training form <= 1e-5; the deploy graph is plain; deploy=True loads it strictly."""
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(name, num_classes=10), seed=1).eval()
    x = torch.randn(*INPUT)
    with torch.no_grad():
        ref = model(x)
        deploy = reparameterize(model, inplace=True)  # inplace=False is covered by test_reparam.py
        out = deploy(x)
    _, rel = compare_outputs(out, ref)
    assert rel <= 1e-5, rel
    _assert_deploy_graph(name, deploy)
    # create_model(deploy=True) has exactly the keys and shapes of the converted model (built on meta: no init cost)
    with torch.device("meta"):
        built = create_model(name, num_classes=10, deploy=True)
    built.load_state_dict(deploy.state_dict(), strict=True, assign=True)
    with torch.no_grad():
        assert torch.equal(built.eval()(x), out)


def _float64_model(name: str) -> nn.Module:
    """``name`` in float64 with randomized BN statistics, eval mode. Built on the meta device and filled with a cheap
    fan-in-scaled uniform init: the package's own init of VGG's 4096-wide classifier, then a float64 copy, costs
    seconds per model, and the fusion's exactness does not depend on how the weights were drawn."""
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
    model = model.to_empty(device="cpu").to(torch.float64)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    with torch.no_grad():
        for p in model.parameters():
            bound = math.sqrt(3.0 / p[0].numel()) if p.ndim > 1 else 0.1
            p.uniform_(-bound, bound, generator=gen)
        for b in model.buffers():
            b.zero_()  # BN statistics: randomize_batchnorm draws them
    return randomize_batchnorm(model, seed=2).eval()


def _big(name: str) -> bool:
    """Models whose float64 test takes seconds (VGG's 100M-parameter classifier; B2/B3/D2se widths)."""
    return name.startswith("vgg") or any(f"_{k}" in name for k in ("b2", "b3", "d2se"))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if _big(n) else n for n in list_models()])
def test_training_vs_deploy_fp64(name):
    """Every registered model (QARepVGG included), float64, deploy vs training <= 1e-12 (design.md section 5)."""
    model = _float64_model(name)
    x = torch.randn(1, *INPUT[1:], dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        assert ref.isfinite().all() and ref.abs().max() > 0
        deploy = reparameterize(model, inplace=True)
        out = deploy(x)
    assert out.dtype == torch.float64
    assert not [n for n, m in deploy.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    _, rel = compare_outputs(out, ref)
    assert rel <= 1e-12, rel


@pytest.mark.parametrize("name", REPVGG_MODELS)
def test_repvgg_architecture(name):
    """Stage widths min(64,64a), 64a, 128a, 256a, 512b; paper depths; stride 2 opens every stage; groupwise
    layers exactly 2, 4, ..., 26; SE (C -> C/16 -> C) in every D2se block."""
    widths, depths, groups = _paper(name)
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
        deployed = create_model(name, num_classes=10, deploy=True)
    assert [1] + [len(s) for s in model.stages] == list(depths)  # stage 0 is the single stem block
    stage_of = [0] + [i + 1 for i, s in enumerate(model.stages) for _ in s]
    blocks, plain = _blocks(model), _blocks(deployed)
    assert len(blocks) == len(plain) == sum(depths)
    first = {sum(depths[:i]) for i in range(5)}
    for layer, (block, dblock) in enumerate(zip(blocks, plain, strict=True)):
        expect_groups = groups if layer in range(2, 27, 2) else 1
        width = widths[stage_of[layer]]
        stride = 2 if layer in first else 1
        conv3, conv1 = block.branch_3x3.conv, block.branch_1x1.conv
        assert (conv3.out_channels, conv3.groups, conv3.stride) == (width, expect_groups, (stride, stride)), layer
        assert (conv1.groups, conv1.stride, conv1.kernel_size) == (expect_groups, (stride, stride), (1, 1)), layer
        assert (block.branch_identity is not None) == (stride == 1 and conv3.in_channels == width), layer
        assert (dblock.reparam.out_channels, dblock.reparam.groups) == (width, expect_groups), layer
        if name == "repvgg_d2se":
            assert isinstance(block.se, SEBlock) and block.se.down.out_channels == width // 16
        else:
            assert isinstance(block.se, nn.Identity)
    assert model.head.fc.in_features == widths[-1]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_repvgg_a0_parameter_counts():
    model = create_model("repvgg_a0")
    assert _count(model) == 9_108_968
    assert _count(reparameterize(model.eval())) == 8_309_384
    with torch.device("meta"):
        assert _count(create_model("repvgg_a0", deploy=True)) == 8_309_384


@pytest.mark.parametrize("name,count", [("vgg16", 138_357_544), ("vgg19", 143_667_240)])
def test_vgg_published_parameter_counts(name, count):
    with torch.device("meta"):
        assert _count(create_model(name)) == count


@pytest.mark.parametrize("name", [n for n in VGG_MODELS if n in {"vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
                                                                  "vgg16_bn", "vgg19", "vgg19_bn"}])
def test_vgg_state_dict_layout_equals_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        ours, theirs = create_model(name), getattr(torchvision.models, name)(weights=None)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name", ["repvgg_a0", "repvgg_b0", "repvgg_b1g4", "repvgg_b2g4", "repvgg_d2se"])
def test_repvgg_parameter_count_equals_timm(name):
    import timm
    with torch.device("meta"):
        assert _count(create_model(name)) == _count(timm.create_model(name, pretrained=False))


@pytest.mark.parametrize("bn_name,plain_name", [("vgg16_bn", "vgg16"), ("vgg11_bn", "vgg11")])
def test_torchvision_weights_load_and_fold_to_plain_torchvision(bn_name, plain_name):
    """torchvision's BN model loads strictly into ours with equal outputs; our folded model loads strictly into
    torchvision's plain model and reproduces the BN model."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv_bn = randomize_batchnorm(getattr(torchvision.models, bn_name)(weights=None), seed=3).eval()
    ours = create_model(bn_name)
    ours.load_state_dict(tv_bn.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(*INPUT)
    with torch.no_grad():
        ref = tv_bn(x)
        assert torch.equal(ours(x), ref)
        folded = reparameterize(ours, inplace=True)
        del tv_bn
        with torch.device("meta"):
            tv_plain = getattr(torchvision.models, plain_name)(weights=None)
        tv_plain.load_state_dict(folded.state_dict(), strict=True, assign=True)
        out = tv_plain.eval()(x)
    _, rel = compare_outputs(out, ref)
    assert rel <= 1e-5, rel


def test_builder_kwargs_reach_the_blocks():
    with torch.device("meta"):
        model = create_model("repvgg_a0", num_classes=7, use_identity=False, use_1x1=False)
    assert model.head.fc.out_features == 7
    assert all(b.branch_identity is None and b.branch_1x1 is None for b in _blocks(model))
