"""``create_model``: a registered model by name, as a classifier or (``features_only``) a feature backbone.

It sits above the registry (a plain table) and :mod:`repvgg_tools.models.features`, which both stay free of it.
"""

from __future__ import annotations

from torch import nn

from .features import create_features
from .registry import get_builder

__all__ = ["create_model"]


def create_model(
    name: str, num_classes: int = 1000, deploy: bool = False, *, features_only: bool = False, **kwargs,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: classifier outputs (ignored with ``features_only``).
        deploy: build the re-parameterized (plain) form directly.
        features_only: build a feature backbone whose ``forward`` returns a list of feature maps and that exposes
            ``feature_info``; takes ``out_indices``, ``output_stride``, ``frozen_stages``, ``norm_eval`` (see
            :mod:`repvgg_tools.models.features`).
        **kwargs: passed to the builder (e.g. ``use_1x1=False``).

    Raises:
        ValueError: unknown name, or ``features_only`` for a model without a feature form.
    """
    builder = get_builder(name)
    if features_only:
        return create_features(name, builder, deploy=deploy, **kwargs)
    return builder(num_classes=num_classes, deploy=deploy, **kwargs)
