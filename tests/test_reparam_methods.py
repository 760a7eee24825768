"""Blocks' own deploy methods never break ``reparameterize`` (issue 19): each runs on a copy and is checked in
float64; one that raises or does not reproduce its block is undone and the block goes to the graph path.

The blocks below follow the patterns published detection and classification code uses (written here, not copied):
YOLOv6's RepVGGBlock reads conv biases that only its model-level ``fuse_model`` step sets, its QARepVGG variants
assign ``None`` to ``.data``, and a method may return normally with a wrong kernel.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repvgg_tools import reparameterize
from repvgg_tools.blocks import conv_bn_kernel_bias
from repvgg_tools.verify import compare_outputs, randomize_batchnorm


class ConvBN(nn.Module):
    """Conv (no bias) then BN; a model-level step (:func:`fold_model`) folds the BN into the conv's bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x)) if hasattr(self, "bn") else self.conv(x)


@torch.no_grad()
def fold_model(model: nn.Module) -> nn.Module:
    """The model-level step (YOLOv6's ``fuse_model`` pattern) the blocks' methods assume has already run."""
    for m in model.modules():
        if isinstance(m, ConvBN) and hasattr(m, "bn"):
            kernel, bias = conv_bn_kernel_bias(m.conv, m.bn)
            m.conv.weight.copy_(kernel)
            m.conv.bias = nn.Parameter(bias)
            del m.bn
    return model


def _identity_kernel(channels: int, like: torch.Tensor) -> torch.Tensor:
    kernel = torch.zeros(channels, channels, 3, 3, dtype=like.dtype, device=like.device)
    kernel[torch.arange(channels), torch.arange(channels), 1, 1] = 1
    return kernel


class Yolo6Style(nn.Module):
    """3x3 conv+BN, 1x1 conv+BN and a BN identity, summed; ``switch_to_deploy`` reads ``branch.conv.bias``."""

    def __init__(self, cin: int = 8, cout: int = 8, stride: int = 1) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense = ConvBN(cin, cout, 3, stride)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride)
        self.act = nn.ReLU()

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        identity = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.act(self.rbr_dense(x) + self.rbr_1x1(x) + identity)

    def _branch(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, ConvBN):
            return branch.conv.weight, branch.conv.bias  # None until the model-level step has run
        std = (branch.running_var + branch.eps).sqrt()
        kernel = _identity_kernel(branch.num_features, branch.weight)
        return kernel * (branch.weight / std).reshape(-1, 1, 1, 1), branch.bias - branch.running_mean * \
            branch.weight / std

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        if hasattr(self, "rbr_reparam"):
            return
        k3, b3 = self._branch(self.rbr_dense)
        k1, b1 = self._branch(self.rbr_1x1)
        kid, bid = self._branch(self.rbr_identity)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]) + kid, b3 + b1 + bid  # TypeError: NoneType + NoneType
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel, bias
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            self.__delattr__(name)


class QAStyle(nn.Module):
    """QARepVGG's layout: 3x3 conv+BN, plain 1x1 conv, identity, a BN after the sum. Its method builds the new conv
    first, then assigns the (still ``None``) bias to ``.data``: it fails half done."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.rbr_dense = ConvBN(channels, channels, 3)
        self.rbr_1x1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        return self.act(self.bn(self.rbr_dense(x) + self.rbr_1x1(x) + x))

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        dense = self.rbr_dense.conv
        kernel = dense.weight + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1]) + _identity_kernel(dense.in_channels,
                                                                                         dense.weight)
        self.rbr_reparam = nn.Conv2d(dense.in_channels, dense.out_channels, 3, 1, 1)
        self.rbr_reparam.weight.data = kernel
        self.rbr_reparam.bias.data = dense.bias  # TypeError: Variable data has to be a tensor, but got NoneType
        std = (self.bn.running_var + self.bn.eps).sqrt()
        self.rbr_reparam.weight.data *= (self.bn.weight / std).reshape(-1, 1, 1, 1)


class OfficialStyle(nn.Module):
    """The official RepVGG block (three BN branches); ``mistake`` makes its method drop the identity branch or use
    another BN eps (it returns normally either way)."""

    def __init__(self, channels: int = 8, mistake: str | None = None) -> None:
        super().__init__()
        self.rbr_identity = nn.BatchNorm2d(channels)
        self.rbr_dense = ConvBN(channels, channels, 3)
        self.rbr_1x1 = ConvBN(channels, channels, 1)
        self.mistake = mistake
        self.calls = 0

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return F.relu(self.rbr_reparam(x))
        return F.relu(self.rbr_dense(x) + self.rbr_1x1(x) + self.rbr_identity(x))

    def _fold(self, branch):
        conv = branch.conv if isinstance(branch, ConvBN) else None
        bn = branch.bn if conv is not None else branch
        kernel = conv.weight if conv is not None else _identity_kernel(bn.num_features, bn.weight)
        eps = 1e-3 if self.mistake == "eps" else bn.eps
        std = (bn.running_var + eps).sqrt()
        return kernel * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        self.calls += 1
        if hasattr(self, "rbr_reparam"):
            return
        k3, b3 = self._fold(self.rbr_dense)
        k1, b1 = self._fold(self.rbr_1x1)
        kid, bid = self._fold(self.rbr_identity)
        if self.mistake == "identity":
            kid, bid = 0, 0
        self.rbr_reparam = nn.Conv2d(k3.shape[1], k3.shape[0], 3, 1, 1)
        self.rbr_reparam.weight.data = k3 + F.pad(k1, [1, 1, 1, 1]) + kid
        self.rbr_reparam.bias.data = b3 + b1 + bid
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            self.__delattr__(name)


class RaisingModel(nn.Module):
    """A model-level method that raises after changing the model: it must be undone like a block's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = QAStyle()

    def forward(self, x):
        return self.block(self.stem(x))

    def switch_to_deploy(self) -> None:
        self.stem = nn.Identity()
        raise RuntimeError("deploy this model with its own export script\nsecond line")


def _net(*blocks: nn.Module, seed: int = 0) -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    return randomize_batchnorm(nn.Sequential(stem, *blocks, nn.Conv2d(8, 4, 1)), seed=seed).eval()


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _rel(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return compare_outputs(a(x), b(x))[1]


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m), m.training) for n, m in model.named_modules()], repr(model))


def _same(a, b) -> bool:
    (sa, ma, ra), (sb, mb, rb) = a, b
    return (sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
            and ma == mb and ra == rb)


def _check_fp32_fp64(model: nn.Module, deployed: nn.Module) -> tuple[float, float]:
    x = torch.randn(2, 3, 19, 17)
    fp32 = _rel(deployed, model, x)
    model64 = copy.deepcopy(model).double()
    fp64 = _rel(reparameterize(model64), model64, x.double())
    assert fp32 <= 1e-5 and fp64 <= 1e-12, (fp32, fp64)
    return fp32, fp64


def test_yolov6_style_method_needing_a_model_step_is_undone():
    model = _net(Yolo6Style(), Yolo6Style(8, 8, stride=2), Yolo6Style(), seed=1)
    with pytest.raises(TypeError, match="unsupported operand type"):  # what the method alone does
        copy.deepcopy(model[1]).switch_to_deploy()
    before = _snapshot(model)
    deployed, report = reparameterize(model, report=True)  # crashed before issue 19
    assert _same(_snapshot(model), before)
    assert not _bns(deployed) and sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == 5
    _check_fp32_fp64(model, deployed)
    assert [(w, n) for w, n, _ in report.undone] == [("1", "switch_to_deploy"), ("2", "switch_to_deploy"),
                                                     ("3", "switch_to_deploy")]
    assert all(why.startswith("raised TypeError: unsupported operand type(s) for +: 'NoneType' and 'NoneType'")
               for _, _, why in report.undone)
    assert "method 1.switch_to_deploy(): undone, raised TypeError" in str(report)
    assert not report.methods and len(report.fused) == 3
    # with the model-level step first, the same methods are used and checked
    prepared = fold_model(copy.deepcopy(model))
    deployed2, report2 = reparameterize(prepared, report=True)
    assert len(report2.methods) == 3 and not report2.undone and not report2.fused
    assert all(how.startswith("checked in float64") for _, _, how in report2.methods)
    assert _rel(deployed2, model, torch.randn(1, 3, 16, 16)) <= 1e-5


def test_qarepvgg_style_method_failing_half_done_is_undone():
    model = _net(QAStyle(), QAStyle(), seed=2)
    with pytest.raises(TypeError, match="Variable data has to be a tensor"):
        copy.deepcopy(model[1]).switch_to_deploy()
    deployed, report = reparameterize(model, report=True)
    assert not any(hasattr(m, "rbr_reparam") for m in deployed.modules())  # the half-built conv is gone
    assert not _bns(deployed) and len(report.fused) == 2
    _check_fp32_fp64(model, deployed)
    assert [w for w, _, _ in report.undone] == ["1", "2"]
    assert all("Variable data has to be a tensor, but got NoneType" in why for _, _, why in report.undone)


@pytest.mark.parametrize("mistake", ["identity", "eps"])
def test_method_with_a_wrong_kernel_is_refused(mistake):
    model = _net(OfficialStyle(mistake=mistake), OfficialStyle(mistake=mistake), seed=3)
    deployed, report = reparameterize(model, report=True)
    assert [w for w, _, _ in report.undone] == ["1", "2"]
    for _, _, why in report.undone:
        assert why.startswith("did not verify: rel err")
        err = float(why.split("rel err ")[1].split(" ")[0])
        assert err > 1e-4, why
    assert not _bns(deployed) and len(report.fused) == 2  # the graph path fused the restored blocks
    assert all(not hasattr(m, "rbr_reparam") for m in deployed.modules())
    _check_fp32_fp64(model, deployed)


def test_correct_method_is_used_and_reparameterize_is_idempotent():
    model = _net(OfficialStyle(), OfficialStyle(), seed=4)
    deployed, report = reparameterize(model, report=True)
    assert [(w, n) for w, n, _ in report.methods] == [("1", "switch_to_deploy"), ("2", "switch_to_deploy")]
    assert not report.undone and not report.fused and not _bns(deployed)
    assert all(m.calls == 1 for m in deployed if isinstance(m, OfficialStyle))
    errs = [float(how.rsplit(" ", 1)[1]) for _, _, how in report.methods]
    assert all(e <= 1e-12 for e in errs), errs  # the method computed its kernel in float64
    assert "method 1.switch_to_deploy(): used (checked in float64" in str(report)
    _check_fp32_fp64(model, deployed)
    state = {k: v.clone() for k, v in deployed.state_dict().items()}
    again, report2 = reparameterize(deployed, report=True)
    assert not report2.undone and not report2.fused
    assert state.keys() == again.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


def test_input_model_untouched_and_inplace_keeps_objects():
    model = _net(OfficialStyle(), Yolo6Style(), QAStyle(), OfficialStyle(mistake="identity"), seed=5)
    model[2].train()  # mixed training flags must survive as they are
    before = _snapshot(model)
    deployed = reparameterize(model)
    assert _same(_snapshot(model), before)
    assert _rel(deployed, model.eval(), torch.randn(1, 3, 12, 12)) <= 1e-5
    model[2].train()
    assert _same(_snapshot(model), before)
    # inplace: blocks whose method was used keep their identity (their contents are replaced)
    blocks = list(model)
    reparam = reparameterize(model.eval(), inplace=True)
    assert reparam is model and model[1] is blocks[1]  # the others went to the graph fuser (rewritten)
    assert hasattr(model[1], "rbr_reparam") and not hasattr(model[4], "rbr_reparam")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_model_level_method_is_undone_like_a_blocks():
    model = randomize_batchnorm(RaisingModel(), seed=6).eval()
    deployed, report = reparameterize(model, report=True)
    assert report.undone[0] == ("", "switch_to_deploy", "raised RuntimeError: deploy this model with its own "
                                "export script")
    assert report.undone[1][0] == "block"  # its children's methods are then tried
    assert not isinstance(deployed.stem, nn.Identity) and not _bns(deployed)
    assert _rel(deployed, model, torch.randn(1, 3, 16, 16)) <= 1e-5


class Untraceable(nn.Module):
    """Data-dependent control flow: the graph fuser cannot trace it and tries its children one by one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn2(self.bn(self.conv(x)))
        return y if x.sum() > 0 else -y


def test_torch_batchnorms_are_not_reported_as_untraced():
    model = _net(Untraceable(), Yolo6Style(), QAStyle(), seed=7)
    deployed, report = reparameterize(model, report=True)
    assert [w for w, _ in report.skipped] == ["Sequential", "1"], report.skipped  # not 1.bn, 1.bn2
    assert "not traced 1.bn" not in str(report)
    assert _rel(deployed, model, torch.randn(1, 3, 10, 10)) <= 1e-5
