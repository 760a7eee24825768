"""Model zoo: importing this package registers every architecture.

Every registered model is also an importable builder function (``from repvgg_tools.models import repvgg_a0``).
"""

from . import qarepvgg, repvgg, vgg  # noqa: F401  (registration side effects)
from .factory import create_model
from .qarepvgg import (
    QAREPVGG_CONFIGS,
    qarepvgg_a0,
    qarepvgg_a1,
    qarepvgg_a2,
    qarepvgg_b0,
    qarepvgg_b1,
    qarepvgg_b1g2,
    qarepvgg_b1g4,
    qarepvgg_b2,
    qarepvgg_b2g2,
    qarepvgg_b2g4,
    qarepvgg_b3,
    qarepvgg_b3g2,
    qarepvgg_b3g4,
)
from .registry import is_model, list_models, register_model
from .repvgg import (
    REPVGG_CONFIGS,
    RepVGG,
    RepVGGConfig,
    repvgg_a0,
    repvgg_a1,
    repvgg_a2,
    repvgg_b0,
    repvgg_b1,
    repvgg_b1g2,
    repvgg_b1g4,
    repvgg_b2,
    repvgg_b2g2,
    repvgg_b2g4,
    repvgg_b3,
    repvgg_b3g2,
    repvgg_b3g4,
    repvgg_d2se,
)
from .vgg import (
    VGG,
    VGG_CONFIGS,
    vgg11,
    vgg11_bn,
    vgg11_lrn,
    vgg13,
    vgg13_bn,
    vgg16,
    vgg16_bn,
    vgg16_c,
    vgg19,
    vgg19_bn,
)

__all__ = [
    "create_model", "is_model", "list_models", "register_model",
    "RepVGG", "RepVGGConfig", "REPVGG_CONFIGS", "QAREPVGG_CONFIGS", "VGG", "VGG_CONFIGS",
    "repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1", "repvgg_b1g2", "repvgg_b1g4", "repvgg_b2",
    "repvgg_b2g2", "repvgg_b2g4", "repvgg_b3", "repvgg_b3g2", "repvgg_b3g4", "repvgg_d2se",
    "qarepvgg_a0", "qarepvgg_a1", "qarepvgg_a2", "qarepvgg_b0", "qarepvgg_b1", "qarepvgg_b1g2", "qarepvgg_b1g4",
    "qarepvgg_b2", "qarepvgg_b2g2", "qarepvgg_b2g4", "qarepvgg_b3", "qarepvgg_b3g2", "qarepvgg_b3g4",
    "vgg11", "vgg11_bn", "vgg11_lrn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg16_c", "vgg19", "vgg19_bn",
]
