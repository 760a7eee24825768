"""Model registry: builders register under a name; ``create_model`` looks them up."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name."""
    if fn.__name__ in _BUILDERS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _BUILDERS[fn.__name__] = fn
    return fn


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _BUILDERS


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a shell-style ``pattern``."""
    from fnmatch import fnmatch

    return sorted(n for n in _BUILDERS if fnmatch(n, pattern))


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
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    if features_only:
        from .features import create_features

        return create_features(name, builder, deploy=deploy, **kwargs)
    return builder(num_classes=num_classes, deploy=deploy, **kwargs)
