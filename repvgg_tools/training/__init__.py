"""Training: YAML recipes with overrides, a timm-based loop (DDP, AMP, EMA, exact resume, custom L2), metrics."""

from .config import RecipeError, apply_overrides, default_recipe, load_recipe, validate_recipe
from .engine import evaluate, train
from .regularizers import custom_l2, param_groups

__all__ = ["RecipeError", "apply_overrides", "default_recipe", "load_recipe", "validate_recipe", "evaluate", "train",
           "custom_l2", "param_groups"]
