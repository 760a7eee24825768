"""RepVGG architectures (Ding et al., 2021) as data, with tiny registered builders.

Layout of the module tree (the "ours" checkpoint layout): ``stem`` (stage 0, one block), ``stages.{0..3}.{j}``
(paper stages 1-4), ``head.fc``. Block keys: ``branch_3x3.{conv,bn}``, ``branch_1x1.{conv,bn}``,
``branch_identity`` (a BatchNorm), ``se.{down,up}``; deployed: ``reparam``. ``block=`` swaps the block class:
QARepVGG (:mod:`repvgg_tools.models.qarepvgg`) is this network with :class:`~repvgg_tools.blocks.QARepVGGBlock`.

``features_only=True`` builds the same tree without ``head`` (and without stages past the last requested level):
``forward`` returns a list of feature maps, see :mod:`repvgg_tools.models.features`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ..blocks import RepVGGBlock
from . import features as feat
from .registry import register_model

__all__ = [
    "RepVGG", "RepVGGConfig", "REPVGG_CONFIGS", "repvgg_widths", "groupwise_layers",
    "repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2", "repvgg_b1g4", "repvgg_b2",
    "repvgg_b2g2", "repvgg_b2g4", "repvgg_b3", "repvgg_b3g2", "repvgg_b3g4", "repvgg_d2se",
]


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
    """A RepVGG classifier or feature backbone: five stages of blocks (:class:`RepVGGBlock` by default), the first
    block of each with stride 2.

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
        features_only: no classifier; ``forward`` returns the feature maps of ``out_indices`` as a list.
        out_indices: feature levels returned with ``features_only`` (0 = stem, 1-4 = ``stages.0-3``); default all.
        output_stride: 8, 16 or 32 (default: the strides as given); below 32 the last stages use stride 1 and
            dilation 2 (and 4) instead.
        frozen_stages: MMPretrain's convention: ``-1`` none, ``0`` the stem, ``k`` the stem and ``stages.0..k-1``
            (parameters get ``requires_grad=False``, modules stay in eval mode through ``train()``).
        norm_eval: keep every BatchNorm in eval mode through ``train()`` (fine-tuning with small batches).
        block: the block class, called as ``block(in_ch, out_ch, stride, groups, dilation, *, se_ratio, deploy,
            use_1x1, use_identity)``; :class:`~repvgg_tools.blocks.QARepVGGBlock` makes a QARepVGG.
    """

    def __init__(
        self, widths: Sequence[int], depths: Sequence[int], layer_groups: Mapping[int, int] | None = None, *,
        num_classes: int = 1000, in_chans: int = 3, se_ratio: float = 0.0,
        strides: Sequence[int] = (2, 2, 2, 2, 2), dilations: Sequence[int] = (1, 1, 1, 1, 1),
        deploy: bool = False, use_1x1: bool = True, use_identity: bool = True,
        features_only: bool = False, out_indices: Sequence[int] | int | None = None, output_stride: int | None = None,
        frozen_stages: int = -1, norm_eval: bool = False, block: Callable[..., nn.Module] = RepVGGBlock,
    ) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 5 or depths[0] != 1:
            raise ValueError("RepVGG needs 5 widths and 5 depths, with one block in stage 0")
        if len(strides) != 5 or len(dilations) != 5:
            raise ValueError("RepVGG needs 5 strides and 5 dilations")
        strides, dilations = feat.output_stride_schedule(strides, dilations, output_stride)
        out_indices = feat.normalize_out_indices(out_indices, feat.NUM_LEVELS)
        num_levels = max(out_indices) + 1 if features_only else feat.NUM_LEVELS
        layer_groups = dict(layer_groups or {})
        block_kw = dict(se_ratio=se_ratio, deploy=deploy, use_1x1=use_1x1, use_identity=use_identity)
        self.widths, self.depths = tuple(widths), tuple(depths)
        self.stem = block(in_chans, widths[0], strides[0], layer_groups.get(0, 1), dilations[0], **block_kw)
        reduction = strides[0]
        info = [{"num_chs": widths[0], "reduction": reduction, "module": "stem"}]
        stages, layer, in_ch = [], 1, widths[0]
        for i in range(num_levels - 1):
            width, stride, dilation = widths[i + 1], strides[i + 1], dilations[i + 1]
            blocks = []
            for j in range(depths[i + 1]):
                groups = layer_groups.get(layer, 1)
                blocks.append(block(in_ch, width, stride if j == 0 else 1, groups, dilation, **block_kw))
                in_ch, layer = width, layer + 1
            stages.append(nn.Sequential(*blocks))
            reduction *= stride
            info.append({"num_chs": width, "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.ModuleList(stages)
        self.num_features = in_ch
        self.features_only = features_only
        self.out_indices = out_indices if features_only else (feat.NUM_LEVELS - 1,)
        self.feature_info = feat.FeatureInfo(info, self.out_indices)
        if not features_only:
            self.head = ClassifierHead(in_ch, num_classes)
        self.frozen_stages = feat.check_frozen_stages(frozen_stages, num_levels)
        self.norm_eval = norm_eval
        self._apply_finetune_modes()

    def _apply_finetune_modes(self) -> None:
        if self.frozen_stages >= 0:
            feat.freeze_modules([self.stem, *self.stages[: self.frozen_stages]])
        if self.norm_eval and self.training:
            feat.set_norm_eval(self)

    def train(self, mode: bool = True) -> RepVGG:
        """Set train/eval mode, keeping frozen stages (and with ``norm_eval`` every BatchNorm) in eval mode."""
        super().train(mode)
        self._apply_finetune_modes()
        return self

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_intermediates(self, x: Tensor) -> list[Tensor]:
        """Feature maps of ``out_indices`` (levels 0 = stem .. 4 = ``stages.3``), shallowest first."""
        outs = []
        x = self.stem(x)
        if 0 in self.out_indices:
            outs.append(x)
        for i, stage in enumerate(self.stages, 1):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            return self.forward_intermediates(x)
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


def _build(cfg: RepVGGConfig, num_classes: int, deploy: bool, **kwargs) -> RepVGG:
    """A :class:`RepVGG` of architecture ``cfg``; ``kwargs`` reach :class:`RepVGG` (e.g. ``block``, ``use_1x1``)."""
    return RepVGG(
        repvgg_widths(cfg.a, cfg.b), cfg.depths, groupwise_layers(cfg.groups, cfg.depths),
        num_classes=num_classes, se_ratio=cfg.se_ratio, deploy=deploy, **kwargs,
    )


# One explicit builder per architecture (importable, visible to IDEs, as in torchvision); ``**kwargs`` reach
# :class:`RepVGG`: ``features_only``, ``out_indices``, ``output_stride``, ``in_chans``, ``use_1x1``, ...


@register_model
def repvgg_a0(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-A0: depths 1-2-4-14-1, widths 48-48-96-192-1280."""
    return _build(REPVGG_CONFIGS["repvgg_a0"], num_classes, deploy, **kwargs)


@register_model
def repvgg_a1(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-A1: depths 1-2-4-14-1, widths 64-64-128-256-1280."""
    return _build(REPVGG_CONFIGS["repvgg_a1"], num_classes, deploy, **kwargs)


@register_model
def repvgg_a2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-A2: depths 1-2-4-14-1, widths 64-96-192-384-1408."""
    return _build(REPVGG_CONFIGS["repvgg_a2"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b0(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B0: depths 1-4-6-16-1, widths 64-64-128-256-1280."""
    return _build(REPVGG_CONFIGS["repvgg_b0"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b1(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B1: depths 1-4-6-16-1, widths 64-128-256-512-2048."""
    return _build(REPVGG_CONFIGS["repvgg_b1"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b1g2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B1g2: depths 1-4-6-16-1, widths 64-128-256-512-2048, 2 groups in layers 2, 4, ..., 26."""
    return _build(REPVGG_CONFIGS["repvgg_b1g2"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b1g4(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B1g4: depths 1-4-6-16-1, widths 64-128-256-512-2048, 4 groups in layers 2, 4, ..., 26."""
    return _build(REPVGG_CONFIGS["repvgg_b1g4"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B2: depths 1-4-6-16-1, widths 64-160-320-640-2560."""
    return _build(REPVGG_CONFIGS["repvgg_b2"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b2g2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B2g2: depths 1-4-6-16-1, widths 64-160-320-640-2560, 2 groups in layers 2, 4, ..., 26."""
    return _build(REPVGG_CONFIGS["repvgg_b2g2"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b2g4(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B2g4: depths 1-4-6-16-1, widths 64-160-320-640-2560, 4 groups in layers 2, 4, ..., 26."""
    return _build(REPVGG_CONFIGS["repvgg_b2g4"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b3(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B3: depths 1-4-6-16-1, widths 64-192-384-768-2560."""
    return _build(REPVGG_CONFIGS["repvgg_b3"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b3g2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B3g2: depths 1-4-6-16-1, widths 64-192-384-768-2560, 2 groups in layers 2, 4, ..., 26."""
    return _build(REPVGG_CONFIGS["repvgg_b3g2"], num_classes, deploy, **kwargs)


@register_model
def repvgg_b3g4(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-B3g4: depths 1-4-6-16-1, widths 64-192-384-768-2560, 4 groups in layers 2, 4, ..., 26."""
    return _build(REPVGG_CONFIGS["repvgg_b3g4"], num_classes, deploy, **kwargs)


@register_model
def repvgg_d2se(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """RepVGG-D2se: depths 1-8-14-24-1, widths 64-160-320-640-2560, SE (C/16) in every block."""
    return _build(REPVGG_CONFIGS["repvgg_d2se"], num_classes, deploy, **kwargs)
