"""RepVGG architectures (Ding et al., 2021) as data, with tiny registered builders.

Layout of the module tree (the "ours" checkpoint layout): ``stem`` (stage 0, one block), ``stages.{0..3}.{j}``
(paper stages 1-4), ``head.fc``. Block keys: ``branch_3x3.{conv,bn}``, ``branch_1x1.{conv,bn}``,
``branch_identity`` (a BatchNorm), ``se.{down,up}``; deployed: ``reparam``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ..blocks import RepVGGBlock
from .registry import register_model

__all__ = ["RepVGG", "RepVGGConfig", "REPVGG_CONFIGS", "repvgg_widths", "groupwise_layers"]


@dataclass(frozen=True)
class RepVGGConfig:
    """One architecture of the paper: depths of stages 0-4, width multipliers ``a``/``b``, groups, SE."""

    depths: tuple[int, int, int, int, int]
    a: float
    b: float
    groups: int = 1  # groups of the groupwise layers (2, 4, ..., 26); 1 = no groupwise layers
    se_ratio: float = 0.0


DEPTHS_A = (1, 2, 4, 14, 1)
DEPTHS_B = (1, 4, 6, 16, 1)

REPVGG_CONFIGS: dict[str, RepVGGConfig] = {
    "repvgg_a0": RepVGGConfig(DEPTHS_A, 0.75, 2.5),
    "repvgg_a1": RepVGGConfig(DEPTHS_A, 1.0, 2.5),
    "repvgg_a2": RepVGGConfig(DEPTHS_A, 1.5, 2.75),
    "repvgg_b0": RepVGGConfig(DEPTHS_B, 1.0, 2.5),
    "repvgg_b1": RepVGGConfig(DEPTHS_B, 2.0, 4.0),
    "repvgg_b1g2": RepVGGConfig(DEPTHS_B, 2.0, 4.0, groups=2),
    "repvgg_b1g4": RepVGGConfig(DEPTHS_B, 2.0, 4.0, groups=4),
    "repvgg_b2": RepVGGConfig(DEPTHS_B, 2.5, 5.0),
    "repvgg_b2g2": RepVGGConfig(DEPTHS_B, 2.5, 5.0, groups=2),
    "repvgg_b2g4": RepVGGConfig(DEPTHS_B, 2.5, 5.0, groups=4),
    "repvgg_b3": RepVGGConfig(DEPTHS_B, 3.0, 5.0),
    "repvgg_b3g2": RepVGGConfig(DEPTHS_B, 3.0, 5.0, groups=2),
    "repvgg_b3g4": RepVGGConfig(DEPTHS_B, 3.0, 5.0, groups=4),
    "repvgg_d2se": RepVGGConfig((1, 8, 14, 24, 1), 2.5, 5.0, se_ratio=1 / 16),
}


def repvgg_widths(a: float, b: float) -> tuple[int, int, int, int, int]:
    """Stage widths ``min(64, 64a), 64a, 128a, 256a, 512b``."""
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))


def groupwise_layers(groups: int, depths: Sequence[int]) -> dict[int, int]:
    """Layer index -> groups for the paper's groupwise layers 2, 4, ..., 26 (stage 0 is layer 0)."""
    if groups == 1:
        return {}
    return {layer: groups for layer in range(2, sum(depths), 2) if layer <= 26}


class RepVGG(nn.Module):
    """A RepVGG classifier: five stages of :class:`RepVGGBlock`, the first block of each with stride 2.

    Args:
        widths: output channels of stages 0-4.
        depths: blocks per stage 0-4.
        layer_groups: layer index (stage 0 = 0, counting every block) -> groups; absent layers use 1.
        num_classes: classifier outputs; 0 leaves out the classifier (``forward`` returns pooled features).
        in_chans: input channels.
        se_ratio: SE reduction in every block (D2se); 0 disables SE.
        strides, dilations: per stage; the first block of a stage uses the stride, every block the dilation.
        deploy: build the plain form directly.
        use_1x1, use_identity: branch switches of every block (ablations).
    """

    def __init__(
        self, widths: Sequence[int], depths: Sequence[int], layer_groups: Mapping[int, int] | None = None, *,
        num_classes: int = 1000, in_chans: int = 3, se_ratio: float = 0.0,
        strides: Sequence[int] = (2, 2, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1, 1),
        deploy: bool = False, use_1x1: bool = True, use_identity: bool = True,
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 5 or depths[0] != 1:
            raise ValueError("RepVGG needs 5 widths and 5 depths, with one block in stage 0")
        layer_groups = dict(layer_groups or {})
        block_kw = dict(se_ratio=se_ratio, deploy=deploy, use_1x1=use_1x1, use_identity=use_identity)
        self.widths, self.depths = tuple(widths), tuple(depths)
        self.stem = RepVGGBlock(in_chans, widths[0], strides[0], layer_groups.get(0, 1), dilations[0], **block_kw)
        stages, layer, in_ch = [], 1, widths[0]
        for width, depth, stride, dilation in zip(widths[1:], depths[1:], strides[1:], dilations[1:]):
            blocks = []
            for j in range(depth):
                groups = layer_groups.get(layer, 1)
                blocks.append(RepVGGBlock(in_ch, width, stride if j == 0 else 1, groups, dilation, **block_kw))
                in_ch, layer = width, layer + 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = in_ch
        self.head = ClassifierHead(in_ch, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class ClassifierHead(nn.Module):
    """Global average pool, flatten and a linear layer (``fc``); ``num_classes=0`` keeps the pooled features."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(x)))


def _build(name: str, num_classes: int, deploy: bool, **kwargs) -> RepVGG:
    cfg = REPVGG_CONFIGS[name]
    return RepVGG(
        repvgg_widths(cfg.a, cfg.b), cfg.depths, groupwise_layers(cfg.groups, cfg.depths),
        num_classes=num_classes, se_ratio=cfg.se_ratio, deploy=deploy, **kwargs,
    )


def _register(name: str) -> None:
    def builder(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
        return _build(name, num_classes, deploy, **kwargs)

    builder.__name__ = builder.__qualname__ = name
    cfg = REPVGG_CONFIGS[name]
    builder.__doc__ = f"RepVGG {name[7:].upper()}: depths {cfg.depths}, a={cfg.a}, b={cfg.b}, groups {cfg.groups}."
    register_model(builder)


for _name in REPVGG_CONFIGS:
    _register(_name)
