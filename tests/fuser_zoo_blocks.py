"""A zoo of re-parameterizable blocks written only from plain torch.nn modules, with no fusion method.

Each follows its paper's training-time structure; the graph fuser must find the single convolution(s) they equal
without being told. ``MINIMAL_CONVS`` gives the number of convolutions each block fuses to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k, stride=1, padding=0, dilation=1, groups=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=False), nn.BatchNorm2d(cout))


class RepVGG(nn.Module):
    """ReLU(BN(conv3x3) + BN(conv1x1) + BN(x))."""

    def __init__(self, cin, cout, stride=1, groups=1, dilation=1) -> None:
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, dilation, dilation, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, 1, groups)
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)


class QARepVGG(nn.Module):
    """ReLU(BN(BN(conv3x3) + conv1x1 + x)): QARepVGG's post-sum BN, plain 1x1, BN-free identity."""

    def __init__(self, cin, cout, stride=1, groups=1, dilation=1) -> None:
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, dilation, dilation, groups)
        self.one = nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False)
        self.identity = cin == cout and stride == 1
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.dense(x) + self.one(x)
        if self.identity:
            out = out + x
        return self.act(self.bn(out))


class ACB(nn.Module):
    """ACNet's asymmetric convolution block: BN(kxk) + BN(1xk) + BN(kx1)."""

    def __init__(self, cin, cout, stride=1, groups=1, dilation=1, k=3) -> None:
        super().__init__()
        p = dilation * (k // 2)
        self.square = conv_bn(cin, cout, k, stride, p, dilation, groups)
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, p), dilation, groups)
        self.ver = conv_bn(cin, cout, (k, 1), stride, (p, 0), dilation, groups)

    def forward(self, x):
        return F.relu(self.square(x) + self.hor(x) + self.ver(x))


class BNAndPad(nn.Module):
    """BN whose output is padded with the value BN gives a zero input (DBB), so a following conv sees no seam."""

    def __init__(self, channels, pad) -> None:
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x):
        out = self.bn(x)
        if self.pad == 0:
            return out
        value = self.bn.bias - self.bn.running_mean * self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        value = value.view(1, -1, 1, 1)
        return F.pad(out - value, [self.pad] * 4) + value


class IdentityBasedConv1x1(nn.Module):
    """DBB's 1x1 conv parameterized as ``weight + identity`` (weights computed in forward)."""

    def __init__(self, channels, groups=1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, channels // groups, 1, 1) * 0.1)
        eye = torch.zeros(channels, channels // groups, 1, 1)
        eye[torch.arange(channels), torch.arange(channels) % (channels // groups)] = 1
        self.register_buffer("id_tensor", eye)
        self.groups = groups

    def forward(self, x):
        return F.conv2d(x, self.weight + self.id_tensor, None, 1, 0, 1, self.groups)


class DBB(nn.Module):
    """Diverse Branch Block: kxk, 1x1, 1x1 -> BN-and-pad -> avgpool -> BN, and 1x1 -> BN-and-pad -> kxk -> BN."""

    def __init__(self, cin, cout, stride=1, groups=1, k=3) -> None:
        super().__init__()
        p = k // 2
        self.origin = conv_bn(cin, cout, k, stride, p, 1, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, 1, groups)
        self.avg = nn.Sequential(nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False), BNAndPad(cout, p),
                                 nn.AvgPool2d(k, stride, 0), nn.BatchNorm2d(cout))
        self.idconv = IdentityBasedConv1x1(cin, groups)
        self.pad1 = BNAndPad(cin, p)
        self.kxk = conv_bn(cin, cout, k, stride, 0, 1, groups)

    def forward(self, x):
        seq = self.kxk(self.pad1(self.idconv(x)))
        return F.relu(self.origin(x) + self.one(x) + self.avg(x) + seq)


class MobileOne(nn.Module):
    """MobileOne block: depthwise (k over-parameterized 3x3 branches + 1x1 scale branch + BN skip) then pointwise
    (k 1x1 branches + BN skip), each followed by ReLU."""

    def __init__(self, cin, cout, stride=1, k=2) -> None:
        super().__init__()
        self.dw = nn.ModuleList(conv_bn(cin, cin, 3, stride, 1, 1, cin) for _ in range(k))
        self.dw_scale = conv_bn(cin, cin, 1, stride, 0, 1, cin)
        self.dw_skip = nn.BatchNorm2d(cin) if stride == 1 else None
        self.pw = nn.ModuleList(conv_bn(cin, cout, 1) for _ in range(k))
        self.pw_skip = nn.BatchNorm2d(cout) if cin == cout else None

    def forward(self, x):
        out = self.dw_scale(x)
        for branch in self.dw:
            out += branch(x)
        if self.dw_skip is not None:
            out += self.dw_skip(x)
        x = F.relu(out)
        out = 0
        for branch in self.pw:
            out = out + branch(x)
        if self.pw_skip is not None:
            out = out + self.pw_skip(x)
        return F.relu(out)


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + layer_scale * (mixer(x) - norm(x))``, mixer = BN(dw kxk) + BN(x), norm = BN(x)."""

    def __init__(self, dim, k=3) -> None:
        super().__init__()
        self.mixer_conv = conv_bn(dim, dim, k, 1, k // 2, 1, dim)
        self.mixer_skip = nn.BatchNorm2d(dim)
        self.norm = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def forward(self, x):
        return x + self.layer_scale * (self.mixer_conv(x) + self.mixer_skip(x) - self.norm(x))


class LargeKernel(nn.Module):
    """FastViT's large-kernel conv: BN(dw 7x7) + BN(dw 3x3), then GELU."""

    def __init__(self, dim, stride=1) -> None:
        super().__init__()
        self.large = conv_bn(dim, dim, 7, stride, 3, 1, dim)
        self.small = conv_bn(dim, dim, 3, stride, 1, 1, dim)

    def forward(self, x):
        return F.gelu(self.large(x) + self.small(x))


class RepGhost(nn.Module):
    """RepGhost module: 1x1 primary conv-BN-ReLU, then BN(dw 3x3) + BN(identity) (the re-param of Ghost's concat)."""

    def __init__(self, cin, cout, dilation=1) -> None:
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.cheap = conv_bn(cout, cout, 3, 1, dilation, dilation, cout)
        self.fusion_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = self.primary(x)
        return F.relu(self.cheap(x) + self.fusion_bn(x))


class RepVGGDW(nn.Module):
    """RepViT's RepVGGDW: BN(BN(dw 3x3) + dw 1x1 with bias + x)."""

    def __init__(self, dim) -> None:
        super().__init__()
        self.conv = conv_bn(dim, dim, 3, 1, 1, 1, dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=dim)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)


class NormLinear(nn.Module):
    """RepViT's classifier: BN1d before a Linear (pre-BN), then a second, distillation head averaged in."""

    def __init__(self, dim, classes) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, classes))
        self.dist = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, classes))

    def forward(self, x):
        x = x.mean((2, 3))
        return (self.head(x) + self.dist(x)) / 2


# Conv2d + Linear modules each block fuses to (NormLinear's two BN->Linear heads and their mean: one Linear)
MINIMAL_CONVS = {"RepVGG": 1, "QARepVGG": 1, "ACB": 1, "DBB": 1, "MobileOne": 2, "RepMixer": 1, "LargeKernel": 1,
                 "RepGhost": 2, "RepVGGDW": 1, "NormLinear": 1}
