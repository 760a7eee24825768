"""Helpers shared by the tests: tiny models (test_layouts.py, test_convert_cli.py), random BN statistics as plain
dicts (test_fusion.py, test_fuser_zoo.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from repvgg_tools import randomize_batchnorm, verify_equivalence
from repvgg_tools.conversion.layouts import LAYOUTS, rename_layout
from repvgg_tools.models import RepVGG

OURS = LAYOUTS["ours"]
WIDTHS, DEPTHS, GROUPS = (8, 8, 16, 16, 32), (1, 2, 2, 2, 1), {2: 2, 4: 2}
# the tiny RepVGG of the export, precision, int8, TensorRT and CLI-error tests (10 classes, no groups)
EXPORT_TINY = dict(widths=(8, 16, 16, 32, 64), depths=(1, 1, 2, 2, 1), num_classes=10)


def export_tiny(bn_seed: int, **kw) -> RepVGG:
    """``RepVGG(**EXPORT_TINY)`` built after ``torch.manual_seed(0)``, BN statistics randomized with ``bn_seed``, in
    eval mode."""
    torch.manual_seed(0)
    return randomize_batchnorm(RepVGG(**{**EXPORT_TINY, **kw}), seed=bn_seed).eval()


def tiny(seed: int = 0, deploy: bool = False, **kw) -> RepVGG:
    """A 5-stage RepVGG with groupwise layers and randomized BN statistics, in eval mode."""
    torch.manual_seed(seed)
    kw = {"num_classes": 5, **kw}
    model = RepVGG(kw.pop("widths", WIDTHS), kw.pop("depths", DEPTHS), kw.pop("layer_groups", GROUPS),
                   deploy=deploy, **kw)
    return randomize_batchnorm(model, seed).eval()


def assert_deploy_equivalent(train: nn.Module, deploy_sd: dict, layout: str = "ours", **kw) -> None:
    """Load the converted weights (renamed to ours) into our own deploy model, compare with the training model."""
    sd = rename_layout(deploy_sd, LAYOUTS[layout], OURS) if layout != "ours" else deploy_sd
    deploy = tiny(deploy=True, **kw)
    deploy.load_state_dict(sd, strict=True)
    result = verify_equivalence(train, deploy, (2, kw.get("in_chans", 3), 32, 32))
    assert result.passed, result


class Detector(nn.Module):
    """A detector-like whole model: our RepVGG as ``backbone.body`` plus heads with their own conv+BN."""

    def __init__(self, deploy: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = tiny(deploy=deploy, num_classes=0)
        self.rpn = nn.Module()
        self.rpn.head = nn.Sequential(nn.Conv2d(32, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.cls = nn.Linear(8, 3)

    def forward(self, x):
        f = self.rpn.head(self.backbone.body.forward_features(x))
        return {"features": f, "logits": self.cls(f.mean((2, 3)))}


def random_bn(channels: int, gen: torch.Generator) -> dict:
    """Float64 BatchNorm statistics and affine parameters, in the dict form the fusion functions take."""
    return {
        "running_mean": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_var": torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5,
        "eps": 1e-5,
        "bn_weight": torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5,
        "bn_bias": torch.randn(channels, generator=gen, dtype=torch.float64),
    }


def bn_eval(y: torch.Tensor, bn: dict) -> torch.Tensor:
    """Eval-mode BatchNorm of ``y`` with a :func:`random_bn` dict."""
    return F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["bn_weight"], bn["bn_bias"], False, 0.0,
                        bn["eps"])
