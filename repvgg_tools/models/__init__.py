"""Model zoo: importing this package registers every architecture."""

from . import repvgg, vgg  # noqa: F401  (registration side effects)
from .registry import create_model, is_model, list_models, register_model
from .repvgg import REPVGG_CONFIGS, RepVGG, RepVGGConfig
from .vgg import VGG, VGG_CONFIGS

__all__ = [
    "create_model", "is_model", "list_models", "register_model",
    "RepVGG", "RepVGGConfig", "REPVGG_CONFIGS", "VGG", "VGG_CONFIGS",
]
