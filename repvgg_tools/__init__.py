"""repvgg-tools: train multi-branch RepVGG/VGG networks, convert them to plain 3x3 stacks, verify, deploy."""

from .blocks import ConvBN, QARepVGGBlock, RepVGGBlock, SEBlock
from .checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint
from .convert import ConversionError, VerificationError, convert_file, convert_state_dict, load_model
from .graph_convert import convert_user_model
from .graph_fuser import FuseReport, graph_fuse
from .models import create_model, list_models, register_model
from .reparam import fold_conv_bn, reparameterize
from .verify import VerifyResult, randomize_batchnorm, verify_equivalence

__version__ = "0.1.0"

__all__ = [
    "ConvBN", "RepVGGBlock", "QARepVGGBlock", "SEBlock", "CheckpointError", "load_checkpoint", "read_state_dict",
    "save_checkpoint",
    "ConversionError", "VerificationError", "convert_file", "convert_state_dict", "load_model", "create_model",
    "list_models", "register_model", "fold_conv_bn", "reparameterize", "VerifyResult", "randomize_batchnorm",
    "verify_equivalence", "graph_fuse", "FuseReport", "convert_user_model", "__version__",
]
