"""repvgg-tools: train multi-branch RepVGG/VGG networks, convert them to plain 3x3 stacks, verify, deploy.

The names below are imported on first use, so ``import repvgg_tools.cli.common`` (what every command's argument
parsing needs) does not import torch: a usage error answers at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ConvBN": "blocks", "RepVGGBlock": "blocks", "QARepVGGBlock": "blocks", "SEBlock": "blocks",
    "CheckpointError": "io.checkpoint", "load_checkpoint": "io.checkpoint", "read_state_dict": "io.checkpoint",
    "save_checkpoint": "io.checkpoint",
    "ConversionError": "conversion.api", "VerificationError": "conversion.api", "convert_file": "conversion.api",
    "convert_state_dict": "conversion.api", "load_model": "conversion.api",
    "convert_user_model": "fx.convert", "FuseReport": "fx.fuser", "graph_fuse": "fx.fuser",
    "create_model": "models", "list_models": "models", "register_model": "models",
    "fold_conv_bn": "reparam", "reparameterize": "reparam",
    "VerifyResult": "verify", "randomize_batchnorm": "verify", "verify_equivalence": "verify",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # what IDEs and type checkers see (the names are re-exported through __all__)
    from .blocks import ConvBN, QARepVGGBlock, RepVGGBlock, SEBlock  # noqa: F401
    from .conversion.api import (  # noqa: F401
        ConversionError,
        VerificationError,
        convert_file,
        convert_state_dict,
        load_model,
    )
    from .fx.convert import convert_user_model  # noqa: F401
    from .fx.fuser import FuseReport, graph_fuse  # noqa: F401
    from .io.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint  # noqa: F401
    from .models import create_model, list_models, register_model  # noqa: F401
    from .reparam import fold_conv_bn, reparameterize  # noqa: F401
    from .verify import VerifyResult, randomize_batchnorm, verify_equivalence  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'repvgg_tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
