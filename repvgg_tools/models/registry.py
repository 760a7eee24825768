"""Model registry: a plain table of builders by name (:func:`~repvgg_tools.models.factory.create_model` builds
from it)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "get_builder", "list_models", "is_model"]

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


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
