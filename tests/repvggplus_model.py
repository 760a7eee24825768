"""A small RepVGGplus with the module tree of the official repo's ``repvggplus.py`` (so its state dict has the same
keys): blocks with ``rbr_dense``/``rbr_1x1``/``rbr_identity`` and SE *after* the ReLU as ``post_se.{down,up}``,
stages holding ``.blocks``, stage 3 split into ``stage3_first``/``stage3_second``, and auxiliary classifiers
``stage1_aux``, ``stage2_aux``, ``stage3_first_aux`` in training form only. Written for the tests from plain torch."""

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class PostSE(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, channels // 4, 1)
        self.up = nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))


class PlusBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, deploy: bool, post_se: bool) -> None:
        super().__init__()
        self.post_se = PostSE(cout) if post_se else nn.Identity()
        if deploy:
            self.rbr_reparam = nn.Conv2d(cin, cout, 3, stride, 1)
            return
        self.rbr_identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.rbr_dense = _conv_bn(cin, cout, 3, stride)
        self.rbr_1x1 = _conv_bn(cin, cout, 1, stride)

    def forward(self, x):
        if hasattr(self, "rbr_reparam"):
            return self.post_se(F.relu(self.rbr_reparam(x)))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.post_se(F.relu(out))


class PlusStage(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, stride: int, deploy: bool, post_se: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PlusBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, deploy, post_se)
                                    for i in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class TinyRepVGGplus(nn.Module):
    """``forward`` returns the main logits (the official model returns them under ``"main"`` in training form)."""

    def __init__(self, deploy: bool = False, num_classes: int = 5, post_se: bool = True,
                 widths=(8, 16, 16, 32), depths=(1, 2, 4, 1)) -> None:
        super().__init__()
        self.stage0 = PlusBlock(3, widths[0], 2, deploy, post_se)
        self.stage1 = PlusStage(widths[0], widths[0], depths[0], 2, deploy, post_se)
        self.stage2 = PlusStage(widths[0], widths[1], depths[1], 2, deploy, post_se)
        self.stage3_first = PlusStage(widths[1], widths[2], depths[2] // 2, 2, deploy, post_se)
        self.stage3_second = PlusStage(widths[2], widths[2], depths[2] - depths[2] // 2, 1, deploy, post_se)
        self.stage4 = PlusStage(widths[2], widths[3], depths[3], 2, deploy, post_se)
        self.gap, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.linear = nn.Linear(widths[3], num_classes)
        if not deploy:
            for name, ch in (("stage1_aux", widths[0]), ("stage2_aux", widths[1]), ("stage3_first_aux", widths[2])):
                down = nn.Sequential()
                down.add_module("conv", nn.Conv2d(ch, ch, 3, 2, 1, bias=False))
                down.add_module("bn", nn.BatchNorm2d(ch))
                down.add_module("relu", nn.ReLU())
                head = nn.Sequential(down, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_classes))
                setattr(self, name, head)

    def forward(self, x):
        for stage in (self.stage0, self.stage1, self.stage2, self.stage3_first, self.stage3_second, self.stage4):
            x = stage(x)
        return self.linear(self.flatten(self.gap(x)))
