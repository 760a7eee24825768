"""The graph fuser on structures nobody wrote a fusion method for, and the tensor math it composes.

Blocks come from ``fuser_zoo_blocks`` (plain torch.nn, no methods). Each must fuse to its minimal number of convs
with no BatchNorm left, fp32 within 1e-5 and float64 within 1e-12 of the training form, over shapes drawn by
hypothesis. The math of :mod:`repvgg_tools.fusion.ops` is checked against the torch operations it replaces,
including the cases where it is not exact.
"""

from __future__ import annotations

import copy

import fuser_zoo_blocks as zoo
import pytest
import torch
import torch.nn.functional as F
from convert_helpers import bn_eval, random_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from repvgg_tools import randomize_batchnorm, reparameterize
from repvgg_tools.fusion import core as fusion
from repvgg_tools.fusion import ops
from repvgg_tools.fx.fuser import graph_fuse
from repvgg_tools.verify import compare_outputs

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model: nn.Module) -> tuple[int, int]:
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    bns = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return convs, bns


@st.composite
def blocks(draw):
    """(name, block, input channels, minimal conv+linear count) for one zoo block with drawn shapes."""
    name = draw(st.sampled_from(sorted(zoo.MINIMAL_CONVS)))
    groups = draw(st.sampled_from([1, 2]))
    cin = groups * draw(st.integers(1, 3))
    cout = draw(st.sampled_from([cin, 2 * cin if cin <= 4 else cin]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    if name == "RepVGG":
        block = zoo.RepVGG(cin, cout, stride, groups, dilation)
    elif name == "QARepVGG":
        block = zoo.QARepVGG(cin, cout, stride, groups, dilation)
    elif name == "ACB":
        block = zoo.ACB(cin, cout, stride, groups, dilation, k=draw(st.sampled_from([3, 5])))
    elif name == "DBB":
        block = zoo.DBB(cin, cout, stride, groups, k=draw(st.sampled_from([3, 5])))
    elif name == "MobileOne":
        block = zoo.MobileOne(cin, cout, stride, k=draw(st.integers(1, 3)))
    elif name == "RepMixer":
        block = zoo.RepMixer(cin, k=draw(st.sampled_from([3, 5])))
    elif name == "LargeKernel":
        block = zoo.LargeKernel(cin, stride)
    elif name == "RepGhost":
        block = zoo.RepGhost(cin, cout, dilation)
    elif name == "RepVGGDW":
        block = zoo.RepVGGDW(cin)
    else:
        block = zoo.NormLinear(cin, cout)
    return name, block, cin, zoo.MINIMAL_CONVS[name]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(blocks(), st.integers(7, 12), st.integers(0, 2**16))
def test_zoo_block_fuses_to_minimal_convs(case, size, seed):
    name, block, cin, expected = case
    torch.manual_seed(seed)
    block = randomize_batchnorm(block, seed=seed).eval()
    for dtype, tol in ((torch.float32, 1e-5), (F64, 1e-12)):
        model = copy.deepcopy(block).to(dtype)
        x = torch.randn(2, cin, size, size, dtype=dtype)
        fused, report = graph_fuse(model, (x,))
        assert _count(fused) == (expected, 0), (name, str(report))
        assert not report.skipped
        with torch.no_grad():
            err = compare_outputs(fused(x), model(x))[1]
        assert err <= tol, (name, dtype, err)
        assert all(p.dtype == dtype for p in fused.parameters())


def test_zoo_through_reparameterize_and_idempotent():
    block = randomize_batchnorm(zoo.DBB(4, 4, 1, 2), seed=1).eval()
    x = torch.randn(2, 4, 9, 9)
    once = reparameterize(block)
    state = {k: v.clone() for k, v in once.state_dict().items()}
    twice, report = reparameterize(once, report=True)
    assert not report.fused and state.keys() == twice.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in twice.state_dict().items())
    with torch.no_grad():
        assert compare_outputs(twice(x), block(x))[1] <= 1e-5


class PreBNPadded(nn.Module):
    """BN then a padded 3x3: folding the BN would change the border (the conv pads BN's output with zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(x)))


class DepthwiseThenExpand(nn.Module):
    """dw 7x7 + BN then a 1x1 expansion: exact as one dense 7x7, but far more weights: must stay two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = zoo.conv_bn(8, 8, 7, 1, 3, 1, 8)
        self.pw = nn.Conv2d(8, 32, 1)

    def forward(self, x):
        return F.gelu(self.pw(self.dw(x)))


def test_not_exact_or_not_worth_it_is_left_with_a_reason():
    x = torch.randn(2, 4, 8, 8)
    model = randomize_batchnorm(PreBNPadded(), seed=2).eval()
    fused, report = graph_fuse(model, (x,))
    assert _count(fused) == (1, 1) and not report.fused
    assert any("border" in why for _, why in report.unfused), str(report)
    model = randomize_batchnorm(DepthwiseThenExpand(), seed=3).eval()
    x = torch.randn(2, 8, 10, 10)
    fused, report = graph_fuse(model, (x,))
    assert _count(fused) == (2, 0) and len(report.fused) == 1  # dw + BN fused, the 1x1 kept
    assert any("weights" in why for _, why in report.unfused), str(report)
    with torch.no_grad():
        assert compare_outputs(fused(x), model(x))[1] <= 1e-5


class SneakyBN(nn.BatchNorm2d):
    """Looks like timm's BatchNormAct2d (a BN subclass whose children are Identity) but doubles its output."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.Identity()

    def forward(self, x):
        return super().forward(x) * 2


def test_a_replacement_that_misses_the_tolerance_is_not_accepted():
    """The per-replacement check is the safety net: a wrong guess about a module is caught and left unfused."""
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SneakyBN(4), nn.ReLU()), seed=4).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = graph_fuse(model, (x,))
    assert not report.fused and any("float64 check" in why for _, why in report.unfused), str(report)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = zoo.RepVGG(4, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.block(x)
        if x.mean() > 0:  # data-dependent: the parent cannot be traced, its children can
            x = x * 2
        return self.head(x)


def test_untraceable_parent_children_still_fuse():
    model = randomize_batchnorm(Untraceable(), seed=5).eval()
    x = torch.randn(2, 4, 8, 8)
    fused, report = graph_fuse(model, (x,))
    assert type(fused) is Untraceable and report.skipped and report.skipped[0][0] == "Untraceable"
    assert _count(fused) == (2, 0)
    with torch.no_grad():
        assert compare_outputs(fused(x), model(x))[1] <= 1e-5


# ---- the tensor math, against the torch operations it replaces ---------------------------------------------------

def _bn(c, seed=0):
    return random_bn(c, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_fuse_bn_before_exact_without_padding_not_with(groups):
    x = torch.randn(2, 6, 9, 9, dtype=F64)
    k, b, bn = torch.randn(6, 6 // groups, 3, 3, dtype=F64), torch.randn(6, dtype=F64), _bn(6)
    k2, b2 = ops.fuse_bn_before(k, b, groups, **bn)
    ref = F.conv2d(bn_eval(x, bn), k, b, groups=groups)
    assert (F.conv2d(x, k2, b2, groups=groups) - ref).abs().max() < 1e-12
    padded = F.conv2d(bn_eval(x, bn), k, b, padding=1, groups=groups)
    assert (F.conv2d(x, k2, b2, padding=1, groups=groups) - padded).abs().max() > 1e-3  # the border differs


def test_bn_after_a_sum_and_bn_branch():
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    k3, k1, bn = torch.randn(4, 2, 3, 3, dtype=F64), torch.randn(4, 2, 1, 1, dtype=F64), _bn(4, 1)
    eye = ops.identity_kernel(4, 3, 2, dtype=F64)
    kernel, bias = fusion.fuse_branches_bn([(k3, None, None), (k1, None, None), (eye, None, None)], bn)
    ref = bn_eval(F.conv2d(x, k3, padding=1, groups=2) + F.conv2d(x, k1, groups=2) + x, bn)
    assert (F.conv2d(x, kernel, bias, padding=1, groups=2) - ref).abs().max() < 1e-12
    for groups in (1, 4):
        kb, bb = ops.bn_branch(4, (3, 5), groups, **bn)
        assert (F.conv2d(x, kb, bb, padding=(1, 2), groups=groups) - bn_eval(x, bn)).abs().max() < 1e-12


def test_asymmetric_kernels_and_dilation():
    x = torch.randn(1, 3, 9, 9, dtype=F64)
    k13, k31 = torch.randn(5, 3, 1, 3, dtype=F64), torch.randn(5, 3, 3, 1, dtype=F64)
    ref = F.conv2d(x, k13, padding=(0, 2), dilation=2) + F.conv2d(x, k31, padding=(2, 0), dilation=2)
    k = ops.add_branches((ops.pad_kernel(k13, 3), torch.zeros(5, dtype=F64)),
                         (ops.pad_kernel(k31, 3), torch.zeros(5, dtype=F64)))[0]
    assert (F.conv2d(x, k, padding=2, dilation=2) - ref).abs().max() < 1e-12
    assert (F.conv2d(x, ops.dilate_kernel(k, 2), padding=2) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (2, 0)])
def test_avg_pool_kernel(stride, padding):
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    ref = F.avg_pool2d(x, 3, stride, padding, count_include_pad=True)
    assert (F.conv2d(x, ops.avg_pool_kernel(4, 3), None, stride, padding, groups=4) - ref).abs().max() < 1e-12
    if padding:  # count_include_pad=False divides by fewer taps at the border: not this kernel
        other = F.avg_pool2d(x, 3, stride, padding, count_include_pad=False)
        assert (F.conv2d(x, ops.avg_pool_kernel(4, 3), None, stride, padding, groups=4) - other).abs().max() > 1e-3


@pytest.mark.parametrize("groups", [1, 2])
def test_merge_1x1_kxk_exact_only_with_bias_padding(groups):
    x = torch.randn(2, 4, 8, 8, dtype=F64)
    k1, b1 = torch.randn(6, 4 // groups, 1, 1, dtype=F64), torch.randn(6, dtype=F64)
    k2, b2 = torch.randn(4, 6 // groups, 3, 3, dtype=F64), torch.randn(4, dtype=F64)
    k, b = ops.merge_1x1_kxk((k1, b1), (k2, b2), groups)
    mid = F.conv2d(x, k1, b1, groups=groups)
    bias_padded = F.pad(mid - b1.view(1, -1, 1, 1), [1] * 4) + b1.view(1, -1, 1, 1)
    ref = F.conv2d(bias_padded, k2, b2, groups=groups)
    assert (F.conv2d(x, k, b, padding=1, groups=groups) - ref).abs().max() < 1e-12
    zero_padded = F.conv2d(mid, k2, b2, padding=1, groups=groups)
    assert (F.conv2d(x, k, b, padding=1, groups=groups) - zero_padded).abs().max() > 1e-3


@pytest.mark.parametrize("g1,g2,s1,s2,d1", [(1, 1, 2, 1, 1), (4, 2, 1, 2, 1), (2, 4, 2, 1, 1), (1, 1, 1, 1, 2)])
def test_compose_convs_unpadded_second(g1, g2, s1, s2, d1):
    x = torch.randn(2, 4, 13, 13, dtype=F64)
    k1, b1 = torch.randn(4, 4 // g1, 3, 3, dtype=F64), torch.randn(4, dtype=F64)
    k2, b2 = torch.randn(8, 4 // g2, 3, 3, dtype=F64), torch.randn(8, dtype=F64)
    ref = F.conv2d(F.conv2d(x, k1, b1, s1, d1, d1, g1), k2, b2, s2, 0, 1, g2)
    k, b, stride, dil, g = ops.compose_convs((k1, b1), (s1, s1), (d1, d1), g1, (k2, b2), (s2, s2), (1, 1), g2)
    assert (F.conv2d(x, k, b, stride, d1, dil, g) - ref).abs().max() < 1e-11


def test_scale_subtract_concat_regroup():
    x = torch.randn(1, 4, 6, 6, dtype=F64)
    ka, kb = torch.randn(4, 1, 3, 3, dtype=F64), torch.randn(4, 1, 3, 3, dtype=F64)
    ba, bb, gamma = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64), torch.rand(4, dtype=F64)
    k, b = ops.scale_branch(*ops.subtract_branches((ka, ba), (kb, bb)), gamma)
    ref = gamma.view(1, -1, 1, 1) * (F.conv2d(x, ka, ba, padding=1, groups=4) - F.conv2d(x, kb, bb, padding=1,
                                                                                          groups=4))
    assert (F.conv2d(x, k, b, padding=1, groups=4) - ref).abs().max() < 1e-12
    dense = [ops.regroup_kernel(ka, 4, 1), ops.regroup_kernel(kb, 4, 1)]
    kc, bc = ops.concat_branches([(dense[0], ba), (dense[1], bb)])
    ref = torch.cat([F.conv2d(x, ka, ba, padding=1, groups=4), F.conv2d(x, kb, bb, padding=1, groups=4)], 1)
    assert (F.conv2d(x, kc, bc, padding=1) - ref).abs().max() < 1e-12
    with pytest.raises(ValueError):
        ops.regroup_kernel(ka, 4, 3)


class Net(nn.Module):
    """Zoo blocks inside a model with its own method: in-place replacement keeps the class, whole_model does not."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(zoo.RepVGG(4, 8, 2), zoo.MobileOne(8, 8), zoo.RepMixer(8))

    def forward(self, x):
        return self.blocks(x).mean((2, 3))

    def width(self) -> int:
        return 8


def test_module_level_and_whole_model_rewrites_agree():
    model = randomize_batchnorm(Net(), seed=6).eval()
    x = torch.randn(2, 4, 12, 12)
    kept, report = graph_fuse(model, (x[:1],))
    whole, report_whole = graph_fuse(model, (x[:1],), whole_model=True)
    assert type(kept) is Net and kept.width() == 8 and isinstance(whole, torch.fx.GraphModule)
    assert len(report.fused) == len(report_whole.fused) == 4
    assert _count(kept) == _count(whole) == (4, 0)
    with torch.no_grad():
        ref = model(x)
        assert compare_outputs(kept(x), ref)[1] <= 1e-5 and compare_outputs(whole(x), ref)[1] <= 1e-5


class InPlaceAlias(nn.Module):
    """``y.mul_(2)`` mutates a tensor that is also read elsewhere: not a pure affine op of ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = y.mul_(2)
        return torch.cat([y, z], 1)


def test_in_place_op_on_a_shared_tensor_is_not_treated_as_pure():
    model = randomize_batchnorm(InPlaceAlias(), seed=7).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, report = graph_fuse(model, (x,))
    with torch.no_grad():
        assert compare_outputs(fused(x), model(x))[1] <= 1e-5
    assert len(report.fused) == 1 and _count(fused) == (1, 0)  # conv + BN only; mul_ stays


def test_structural_prescan():
    """A deployed network (SE gates included) needs no forward pass; a training block does."""
    from repvgg_tools import create_model
    from repvgg_tools.fx.plan import may_fuse
    from repvgg_tools.fx.trace import FusionTracer

    deployed = create_model("repvgg_a0", num_classes=10, deploy=True).eval()
    se = zoo.RepVGG(4, 4)
    se.act = nn.Identity()  # conv sums feeding straight into the next op: fusable
    for model, expected in ((deployed, False), (zoo.RepMixer(4), True), (se, True), (InPlaceAlias(), True)):
        assert may_fuse(FusionTracer().trace(model), model) is expected, type(model).__name__

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) * torch.sigmoid(self.conv(x))  # a product of two computed tensors

    gated = Gated()
    assert may_fuse(FusionTracer().trace(gated), gated) is False


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BN module that applies its activation child itself."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def test_bn_module_with_its_own_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), BNAct(4), nn.Conv2d(4, 4, 1), BNAct(4))
    model = randomize_batchnorm(model, seed=8).eval()
    x = torch.randn(2, 3, 7, 7)
    fused, report = graph_fuse(model, (x,))
    assert _count(fused) == (2, 0) and sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 2
    assert all("ReLU" in f.after for f in report.fused) and len(report.fused) == 2
    with torch.no_grad():
        assert compare_outputs(fused(x), model(x))[1] <= 1e-5
