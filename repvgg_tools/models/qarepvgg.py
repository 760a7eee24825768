"""QARepVGG (Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024): the RepVGG
architectures built from :class:`~repvgg_tools.blocks.QARepVGGBlock`.

Each ``qarepvgg_*`` model is the :class:`~repvgg_tools.models.repvgg.RepVGG` of the same-named RepVGG architecture
with QA blocks: same module tree, ``features_only``, ``output_stride``, ``frozen_stages``, ``norm_eval`` and
``deploy=True``. Block keys (the "ours" layout): ``branch_3x3.{conv,bn}``, ``branch_1x1.weight`` (a plain 1x1 conv),
``post_bn`` (the BatchNorm after the sum), ``se.{down,up}``; deployed: ``reparam``, exactly as RepVGG's deploy form.
"""

from __future__ import annotations

from ..blocks import QARepVGGBlock
from .registry import register_model
from .repvgg import REPVGG_CONFIGS, RepVGG, RepVGGConfig, _build

__all__ = [
    "QAREPVGG_CONFIGS",
    "qarepvgg_a0", "qarepvgg_a1", "qarepvgg_a2", "qarepvgg_b0", "qarepvgg_b1", "qarepvgg_b1g2", "qarepvgg_b1g4",
    "qarepvgg_b2", "qarepvgg_b2g2", "qarepvgg_b2g4", "qarepvgg_b3", "qarepvgg_b3g2", "qarepvgg_b3g4",
]

# QARepVGG name -> its RepVGG architecture (the paper's M1-M4 change the block, not the network)
QAREPVGG_CONFIGS: dict[str, RepVGGConfig] = {f"qa{name}": REPVGG_CONFIGS[name] for name in (
    "repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2", "repvgg_b1g4", "repvgg_b2",
    "repvgg_b2g2", "repvgg_b2g4", "repvgg_b3", "repvgg_b3g2", "repvgg_b3g4",
)}


def _build_qa(name: str, num_classes: int, deploy: bool, **kwargs) -> RepVGG:
    return _build(QAREPVGG_CONFIGS[name], num_classes, deploy, block=QARepVGGBlock, **kwargs)


@register_model
def qarepvgg_a0(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-A0: RepVGG-A0's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_a0", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_a1(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-A1: RepVGG-A1's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_a1", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_a2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-A2: RepVGG-A2's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_a2", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b0(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B0: RepVGG-B0's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b0", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b1(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B1: RepVGG-B1's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b1", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b1g2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B1g2: RepVGG-B1g2's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b1g2", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b1g4(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B1g4: RepVGG-B1g4's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b1g4", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B2: RepVGG-B2's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b2", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b2g2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B2g2: RepVGG-B2g2's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b2g2", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b2g4(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B2g4: RepVGG-B2g4's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b2g4", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b3(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B3: RepVGG-B3's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b3", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b3g2(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B3g2: RepVGG-B3g2's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b3g2", num_classes, deploy, **kwargs)


@register_model
def qarepvgg_b3g4(*, num_classes: int = 1000, deploy: bool = False, **kwargs) -> RepVGG:
    """QARepVGG-B3g4: RepVGG-B3g4's architecture with QARepVGG blocks."""
    return _build_qa("qarepvgg_b3g4", num_classes, deploy, **kwargs)
