"""``reparameterize``: copies by default, idempotent, any dtype, warns in train mode, folds users' own models."""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict

import pytest
import torch
from torch import nn

import repvgg_tools
from repvgg_tools import create_model, fold_conv_bn, randomize_batchnorm, reparameterize
from repvgg_tools.blocks import RepVGGBlock, conv_bn_kernel_bias
from repvgg_tools.models import RepVGG
from repvgg_tools.models.vgg import VGG_CONFIGS, make_vgg_features
from repvgg_tools.verify import compare_outputs

LOGGER = "repvgg_tools.reparam"


def _tiny_repvgg(seed: int = 0, dtype: torch.dtype = torch.float32) -> RepVGG:
    """A small RepVGG with every feature of the zoo: stride 2, in != out, identity branches, groups, SE."""
    torch.manual_seed(seed)
    model = RepVGG((8, 16, 16, 32, 32), (1, 2, 2, 2, 1), {2: 2, 4: 2}, num_classes=10, se_ratio=0.25)
    return randomize_batchnorm(model.to(dtype), seed=seed).eval()


def _vgg_bn(seed: int = 0) -> nn.Module:
    """VGG-A features with BatchNorm (torchvision's layout) under a small head: the full classifier is not needed."""
    torch.manual_seed(seed)
    model = nn.Sequential(make_vgg_features(VGG_CONFIGS["A"], batch_norm=True), nn.Flatten(1), nn.Linear(512, 10))
    return randomize_batchnorm(model, seed=seed).eval()


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _rel(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return compare_outputs(model_a(x), model_b(x))[1]


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("factory", [_tiny_repvgg, _vgg_bn], ids=["repvgg", "vgg_bn"])
def test_copy_by_default_leaves_the_original_untouched(factory):
    model = factory()
    before = _state(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    deployed = reparameterize(model)
    assert deployed is not model
    assert _same_state(before, _state(model))
    assert _bns(model) and not _bns(deployed)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        assert compare_outputs(deployed(x), ref)[1] <= 1e-5


def test_inplace_returns_the_same_object():
    model = _tiny_repvgg()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert reparameterize(model, inplace=True) is model
        assert not _bns(model) and model.stem.is_deployed
        assert compare_outputs(model(x), ref)[1] <= 1e-5


def test_idempotent():
    x = torch.randn(2, 3, 32, 32)
    once = reparameterize(_tiny_repvgg(seed=1))
    state = _state(once)
    twice = reparameterize(once)
    assert _same_state(state, _state(twice))
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))
    assert reparameterize(once, inplace=True) is once and _same_state(state, _state(once))
    # VGG-BN: the folded Sequential is not folded (or renumbered) again
    vgg = reparameterize(_vgg_bn(seed=2))
    keys = list(vgg.state_dict())
    assert keys[:4] == ["0.0.weight", "0.0.bias", "0.3.weight", "0.3.bias"]  # conv, relu, pool, conv
    assert list(reparameterize(vgg).state_dict()) == keys


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)], ids=["fp16", "bf16"])
def test_low_precision_models_convert(dtype, tol):
    """Fused weights equal the float64 conversion of the same weights rounded once; outputs match float64."""
    model64 = _tiny_repvgg(seed=3, dtype=torch.float64)
    low = copy.deepcopy(model64).to(dtype)
    deployed = reparameterize(low)
    assert all(p.dtype == dtype for p in deployed.parameters())
    exact = reparameterize(copy.deepcopy(low).double())  # the same rounded values, converted in float64
    ulp = torch.finfo(dtype).eps
    for (name, got), (_, ref) in zip(deployed.state_dict().items(), exact.state_dict().items(), strict=True):
        rounded = ref.to(dtype)
        assert ((got.double() - rounded.double()).abs() <= ulp * rounded.double().abs()).all(), name
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ref = model64(x)
        rel_train = compare_outputs(low(x.to(dtype)), ref)[1]
        rel_deploy = compare_outputs(deployed(x.to(dtype)), ref)[1]
    assert rel_deploy <= tol, (rel_deploy, rel_train)


def test_train_mode_warns_and_uses_running_statistics(caplog):
    model = _tiny_repvgg(seed=5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        reparameterize(model)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    model.train()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        deployed = reparameterize(model)
    assert any("train mode" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    x = torch.randn(4, 3, 32, 32)
    assert _rel(deployed.eval(), model.eval(), x) <= 1e-5  # running statistics, not batch statistics


class UserNet(nn.Module):
    """Conv/BN attributes wired in ``forward`` (no Sequential), with pairs that must and must not fold."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)  # with bias
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)  # conv3's output is also used elsewhere: must stay
        self.bn4 = nn.BatchNorm2d(8)  # follows a ReLU, not a conv: must stay
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.bn2(self.conv2(x)) + x
        y = self.conv3(x)
        x = self.bn3(y) + y
        x = self.bn4(torch.relu(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
def test_user_model_attributes_fold_through_fx(dtype, tol):
    torch.manual_seed(0)
    model = randomize_batchnorm(UserNet().to(dtype), seed=6).eval()
    # the pairwise fx fold alone keeps the class: plain Conv->BN pairs fold, the rest stays
    folded = copy.deepcopy(model)
    assert fold_conv_bn(folded) == 2
    assert isinstance(folded.bn, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn3, nn.BatchNorm2d) and isinstance(folded.bn4, nn.BatchNorm2d)
    assert folded.conv.bias is not None and folded.conv.bias.dtype == dtype
    # the graph fuser then folds ``bn3(y) + y`` (y = conv3(x), read twice) and ``bn2(conv2(x)) + x`` into one conv
    # each; bn4 follows a ReLU: no conv to fold into
    deployed, report = reparameterize(model, report=True)
    assert [type(m) for m in deployed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [nn.BatchNorm2d]
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == 3
    assert len(report.fused) == 2 and any("bn4" in why for _, why in report.unfused)
    assert all(p.dtype == dtype for p in deployed.parameters())
    assert _rel(deployed, model, torch.randn(2, 3, 12, 12, dtype=dtype)) <= tol
    assert fold_conv_bn(deployed) == 0  # nothing left to fold
    again, report = reparameterize(deployed, report=True)
    assert not report.fused and _same_state(_state(again), _state(deployed))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.body(x)
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = self.bn(self.conv(x))
        return x


def test_untraceable_model_folds_sequential_pairs_and_warns(caplog):
    torch.manual_seed(0)
    model = randomize_batchnorm(Untraceable(), seed=7).eval()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        deployed = reparameterize(model)
    assert [type(m) for m in deployed.body] == [nn.Conv2d, nn.ReLU]
    assert isinstance(deployed.bn, nn.BatchNorm2d)  # could not be found without tracing
    assert any("trace" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert _rel(deployed, model, torch.randn(2, 3, 8, 8)) <= 1e-5


def test_sequential_folding_rules():
    """Index-named Sequentials are renumbered (vgg*_bn -> vgg* layout); named ones keep their names; a BN that does
    not follow a conv, or that keeps no running statistics, stays."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(OrderedDict(conv=nn.Conv2d(8, 8, 3, padding=1, groups=4), bn=nn.BatchNorm2d(8), act=nn.ReLU())),
        nn.BatchNorm2d(8),  # follows a Sequential, and through it a ReLU
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
    )
    model = randomize_batchnorm(model, seed=8).eval()
    x = torch.randn(2, 3, 7, 7)
    deployed = copy.deepcopy(model)
    assert fold_conv_bn(deployed) == 2
    assert list(deployed._modules) == ["0", "1", "2", "3", "4", "5"]
    assert [type(m) for m in deployed] == [nn.Conv2d, nn.ReLU, nn.Sequential, nn.BatchNorm2d, nn.Conv2d,
                                           nn.BatchNorm2d]
    assert list(deployed[2]._modules) == ["conv", "act"]
    assert _rel(deployed, model, x) <= 1e-5
    # the graph fuser then folds the BN after the ReLU into the unpadded 1x1 conv that follows it (exact: no border)
    fused, report = reparameterize(model, report=True)
    assert [type(m) for m in _bns(fused)] == [nn.BatchNorm2d] and not _bns(fused)[0].track_running_stats
    assert len(report.fused) == 1 and _rel(fused, model, x) <= 1e-5


def test_bare_block_and_vgg_fold_counts():
    block = randomize_batchnorm(RepVGGBlock(4, 4, groups=2), seed=9).eval()
    deployed = reparameterize(block)
    assert deployed.is_deployed and not _bns(deployed)
    assert _rel(deployed, block, torch.randn(2, 4, 6, 6)) <= 1e-5
    with torch.device("meta"):
        vgg = create_model("vgg16_bn", num_classes=10)
        plain = create_model("vgg16", num_classes=10)
    assert fold_conv_bn(vgg) == 13
    assert {k: v.shape for k, v in vgg.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # shape-only (meta) models convert too: the deploy structure without computing any weights
    with torch.device("meta"):
        meta = reparameterize(create_model("repvgg_b1g4", num_classes=10), inplace=True)
        built = create_model("repvgg_b1g4", num_classes=10, deploy=True)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}


class SelfConverting(nn.Module):
    """A user's model whose own ``reparameterize`` delegates to the library: must not recurse."""

    def __init__(self) -> None:
        super().__init__()
        self.block = RepVGGBlock(4, 4)
        self.calls = 0

    def forward(self, x):
        return self.block(x)

    def reparameterize(self) -> None:
        self.calls += 1
        repvgg_tools.reparameterize(self, inplace=True)


def test_model_with_own_reparameterize_method():
    model = randomize_batchnorm(SelfConverting(), seed=10).eval()
    deployed = reparameterize(model)
    assert deployed.calls == 1 and deployed.block.is_deployed
    assert _rel(deployed, model, torch.randn(1, 4, 5, 5)) <= 1e-5


class BNAndPadUser(nn.Module):
    """DBB's "BN and pad": the module reads its BN's tensors to pad with the BN's shift after calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        out = self.bn(self.conv(x))
        value = self.bn.bias - self.bn.running_mean * self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        out = nn.functional.pad(out - value.view(1, -1, 1, 1), [1, 1, 1, 1]) + value.view(1, -1, 1, 1)
        return self.conv2(out)


def test_bn_read_elsewhere_is_not_replaced_by_identity():
    """Regression: the fx fold replaced a BN by nn.Identity although the pad code reads bn.bias (DBB: AttributeError
    'Identity' object has no attribute 'bias'). Now such a BN stays for the fold; the graph fuser merges it exactly."""
    model = randomize_batchnorm(BNAndPadUser(), seed=11).eval()
    folded = copy.deepcopy(model)
    assert fold_conv_bn(folded) == 0 and isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 4, 9, 9)
    assert _rel(folded, model, x) == 0
    deployed = reparameterize(model)
    assert not _bns(deployed) and sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == 1
    assert _rel(deployed, model, x) <= 1e-5


# ---- third-party deploy methods (issue 10) --------------------------------------------------------------------

class _Branchy(nn.Module):
    """Two conv+BN branches summed; ``deploy()`` merges them exactly (the body every stand-in shares)."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.b = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.calls = 0

    def forward(self, x):
        if hasattr(self, "merged"):
            return torch.relu(self.merged(x))
        return torch.relu(self.a(x) + self.b(x))

    @torch.no_grad()
    def deploy(self) -> None:
        self.calls += 1
        if hasattr(self, "merged"):
            return
        ka, ba = conv_bn_kernel_bias(self.a[0], self.a[1])
        kb, bb = conv_bn_kernel_bias(self.b[0], self.b[1])
        self.merged = nn.Conv2d(ka.shape[1], ka.shape[0], 3, padding=1)
        self.merged.weight.copy_(ka + nn.functional.pad(kb, [1, 1, 1, 1]))
        self.merged.bias.copy_(ba + bb)
        del self.a, self.b


class TimmStyle(_Branchy):
    def reparameterize(self) -> None:  # timm: in place, no arguments
        self.deploy()


class OfficialStyle(_Branchy):
    def switch_to_deploy(self) -> None:  # official RepVGG/DBB, MMPretrain, YOLOv6 RepVGGBlock
        self.deploy()


class FuseReturnsReplacement(_Branchy):
    def fuse(self) -> nn.Module:  # timm RepViT: returns the module that replaces it
        self.deploy()
        return nn.Sequential(self.merged, nn.ReLU())


class FuseWithArgument(_Branchy):
    """A ``fuse`` that means something else and needs an argument: must never be called."""

    def fuse(self, other: nn.Module) -> None:
        raise AssertionError("fuse(other) must not be called")


class Parent(nn.Module):
    """A parent whose own method converts its children: the children's methods must not run again."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = OfficialStyle()

    def forward(self, x):
        return self.inner(x)

    def switch_to_deploy(self) -> None:
        self.inner.switch_to_deploy()


@pytest.mark.parametrize("cls", [TimmStyle, OfficialStyle, FuseReturnsReplacement], ids=["timm", "official", "fuse"])
def test_third_party_methods_are_called(cls):
    model = randomize_batchnorm(nn.Sequential(cls(), cls()), seed=12).eval()
    x = torch.randn(2, 4, 7, 7)
    deployed, report = reparameterize(model, report=True)
    assert not _bns(deployed) and not report.fused  # the methods did it; nothing left for the graph fuser
    if cls is FuseReturnsReplacement:
        assert [type(m) for m in deployed] == [nn.Sequential, nn.Sequential]
    else:
        assert all(m.calls == 1 for m in deployed)
    assert _rel(deployed, model, x) <= 1e-5


def test_method_with_required_argument_is_not_called():
    model = randomize_batchnorm(FuseWithArgument(), seed=13).eval()
    x = torch.randn(2, 4, 7, 7)
    deployed, report = reparameterize(model, report=True)  # would raise if fuse(other) were called
    assert not _bns(deployed) and len(report.fused) == 1  # the graph fuser merged the branches instead
    assert _rel(deployed, model, x) <= 1e-5


def test_ancestor_method_handles_its_children_once():
    model = randomize_batchnorm(Parent(), seed=14).eval()
    deployed = reparameterize(model)
    assert deployed.inner.calls == 1 and hasattr(deployed.inner, "merged")
    assert _rel(deployed, model, torch.randn(1, 4, 6, 6)) <= 1e-5


def test_methods_false_uses_the_graph_fuser_alone():
    model = randomize_batchnorm(TimmStyle(), seed=15).eval()
    deployed, report = reparameterize(model, methods=False, report=True)
    assert model.calls == 0 and len(report.fused) == 1 and not _bns(deployed)
    assert _rel(deployed, model, torch.randn(1, 4, 6, 6)) <= 1e-5
