"""Issue 19: a conv after a conv whose border reads only padding (a 1xk before a padded kx1) composes exactly, and
a symmetric input crop (ACNet with padding below k//2) is a negative padding that a padded branch evens out.

The composition rule (:func:`repvgg_tools.fx.maps.apply_op`): along each axis where the second conv pads, the first
map, evaluated one step past its output's edges, must read only zero padding (stride 1 and ``d (k - 1) <= p``) and
its bias must be zero; checked here against ``F.conv2d`` in float64, borders included, and by brute force.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repvgg_tools import randomize_batchnorm, reparameterize
from repvgg_tools.fx.maps import AffineMap, Op, Refused, apply_op

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _identity(c: int) -> AffineMap:
    return AffineMap(None, torch.ones(c, 1, 1, 1, dtype=F64), torch.zeros(c, dtype=F64), (1, 1), (0, 0), (1, 1), c, 4)


def _op(w, b, padding, groups) -> Op:
    return Op("conv", w, b, (1, 1), padding, (1, 1), groups, "conv")


def _two(c, groups, k1, p1, k2, p2, bias1=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(c, c // groups, *k1, generator=gen, dtype=F64)
    w2 = torch.randn(c, c // groups, *k2, generator=gen, dtype=F64)
    b1 = torch.randn(c, generator=gen, dtype=F64) if bias1 else torch.zeros(c, dtype=F64)
    b2 = torch.randn(c, generator=gen, dtype=F64)
    x = torch.randn(2, c, 9, 11, generator=gen, dtype=F64)
    ref = F.conv2d(F.conv2d(x, w1, b1, 1, p1, 1, groups), w2, b2, 1, p2, 1, groups)
    m = apply_op(apply_op(_identity(c), _op(w1, b1, p1, groups)), _op(w2, b2, p2, groups))
    out = F.conv2d(x, m.kernel, m.bias, m.stride, m.padding, m.dilation, m.groups)
    return m, ref, out


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("vertical_first", [False, True])
def test_separable_pair_is_one_kxk(k, depthwise, vertical_first):
    c = 4
    groups = c if depthwise else 1
    pairs = [((1, k), (0, k // 2)), ((k, 1), (k // 2, 0))]
    (k1, p1), (k2, p2) = pairs[::-1] if vertical_first else pairs
    m, ref, out = _two(c, groups, k1, p1, k2, p2)
    assert tuple(m.kernel.shape[-2:]) == (k, k) and m.padding == (k // 2, k // 2) and m.groups == groups
    assert ref.shape == out.shape
    assert (out - ref).abs().max() <= 1e-12 * ref.abs().max()


@pytest.mark.parametrize("k1,p1,k2,p2,bias1", [
    ((3, 3), (1, 1), (3, 3), (1, 1), False),  # padded 3x3 after padded 3x3
    ((3, 3), (0, 0), (3, 3), (1, 1), False),  # padded 3x3 after a valid 3x3
    ((1, 3), (0, 1), (1, 3), (0, 1), False),  # both pad the same axis
    ((1, 3), (0, 1), (3, 1), (1, 0), True),  # the 1x3's bias would reach the 3x1's zero rows
])
def test_real_border_refusals_stand(k1, p1, k2, p2, bias1):
    with pytest.raises(Refused, match="border would differ"):
        _two(4, 4, k1, p1, k2, p2, bias1)


def test_rule_is_exact_and_complete():
    """Every (kernel, padding) pair per axis, stride 1, zero first bias: accepted iff the composition is exact."""
    shapes = [(1, 0), (1, 1), (3, 0), (3, 1), (3, 2)]
    for (kh1, ph1), (kw1, pw1), (kh2, ph2), (kw2, pw2) in itertools.product(shapes, repeat=4):
        try:
            m, ref, out = _two(2, 2, (kh1, kw1), (ph1, pw1), (kh2, kw2), (ph2, pw2))
        except Refused:
            gen = torch.Generator().manual_seed(1)
            w1, w2 = torch.randn(2, 1, kh1, kw1, generator=gen, dtype=F64), torch.randn(2, 1, kh2, kw2, dtype=F64)
            x = torch.randn(1, 2, 9, 11, generator=gen, dtype=F64)
            ref = F.conv2d(F.conv2d(x, w1, None, 1, (ph1, pw1), 1, 2), w2, None, 1, (ph2, pw2), 1, 2)
            big = F.conv2d(x, torch.ones(2, 1, 1, 1, dtype=F64), None, 1, (ph1 + ph2, pw1 + pw2), 1, 2)
            naive = F.conv2d(F.conv2d(big, w1, None, 1, 0, 1, 2), w2, None, 1, 0, 1, 2)
            assert (naive - ref).abs().max() > 1e-6, ((kh1, kw1), (ph1, pw1), (kh2, kw2), (ph2, pw2))
            continue
        assert ref.shape == out.shape and (out - ref).abs().max() <= 1e-12 * ref.abs().max()


def _conv_bn(cin, cout, k, padding, groups):
    return nn.Sequential(nn.Conv2d(cin, cout, k, 1, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class SeparableMix(nn.Module):
    """RepNeXt-like: BN(dw kxk) + BN(dw kx1(dw 1xk)) + x."""

    def __init__(self, c, k) -> None:
        super().__init__()
        self.square = _conv_bn(c, c, k, k // 2, c)
        self.row = nn.Conv2d(c, c, (1, k), 1, (0, k // 2), groups=c, bias=False)
        self.col = _conv_bn(c, c, (k, 1), (k // 2, 0), c)

    def forward(self, x):
        return self.square(x) + self.col(self.row(x)) + x


class CroppedAsym(nn.Module):
    """ACNet-style with padding 0: BN(3x3) + BN(1x3 of the rows 1:-1) + BN(3x1 of the columns 1:-1)."""

    def __init__(self, cin, cout, groups=1) -> None:
        super().__init__()
        self.square = _conv_bn(cin, cout, 3, 0, groups)
        self.hor = _conv_bn(cin, cout, (1, 3), 0, groups)
        self.ver = _conv_bn(cin, cout, (3, 1), 0, groups)

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x[:, :, 1:-1, :]) + self.ver(x[..., 1:-1]))


class CroppedAlone(nn.Module):
    """A crop no padding evens out: the 1x3 of rows 1:-1 alone."""

    def __init__(self, c) -> None:
        super().__init__()
        self.hor = _conv_bn(c, c, (1, 3), 0, 1)

    def forward(self, x):
        return F.relu(self.hor(x[:, :, 1:-1, :]))


def _check(model, shape, convs):
    randomize_batchnorm(model, seed=0)
    model.eval()
    fused, report = reparameterize(model, methods=False, report=True)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == convs, str(report)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), str(report)
    fused64 = reparameterize(copy.deepcopy(model).double(), methods=False)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref, out = model(x), fused(x)
        err32 = float((out - ref).abs().max() / ref.abs().max())
        ref64, out64 = model.double()(x.double()), fused64(x.double())
        err64 = float((out64 - ref64).abs().max() / ref64.abs().max())
    assert err32 <= 1e-5 and err64 <= 1e-12, (err32, err64)
    return report


@pytest.mark.parametrize("k", [3, 5, 7])
def test_separable_branch_fuses_into_one_conv(k):
    report = _check(SeparableMix(6, k), (2, 6, 13, 12), 1)
    assert len(report.fused) == 1 and not report.unfused


@pytest.mark.parametrize("groups", [1, 2])
def test_cropped_acnet_block_fuses_into_one_valid_3x3(groups):
    report = _check(CroppedAsym(4, 6, groups), (2, 4, 10, 9), 1)
    assert len(report.fused) == 1 and not report.unfused
    assert "kernel_size=(3, 3)" in report.fused[0].after and "padding" not in report.fused[0].after


def test_crop_nothing_evens_out_is_reported():
    _check(CroppedAlone(3), (1, 3, 8, 8), 1)  # the crop stays a slice; its conv and BN still fuse
