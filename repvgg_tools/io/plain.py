"""What :class:`repvgg_tools.io.safe_pickle.SafeUnpickler` read, as tensors and plain data.

Placeholders never leave the reading code: dict-like objects become dicts, objects their recorded state, NumPy values
numbers and lists, a pickled ``nn.Module`` its state dict. Shared references are converted once (a memo), so a small
file cannot expand into an exponentially large structure, and nesting is bounded.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from .pickle_rules import DEFAULT_LIMITS, Limits, PickleLimitError, Placeholder, is_placeholder_class

__all__ = ["to_plain"]


def _numpy_value(obj: Placeholder) -> Any:
    """A NumPy scalar or array placeholder decoded to a Python number or (nested) list; ``None`` if it is not one."""
    name = obj._ph_name.rsplit(".", 1)[-1]
    try:
        import numpy as np

        if name == "scalar" and len(obj._ph_args) == 2:
            dtype, raw = obj._ph_args
            return np.frombuffer(raw, dtype=_numpy_dtype(dtype))[0].item()
        if name == "_reconstruct" and isinstance(obj._ph_state, tuple) and len(obj._ph_state) == 5:
            _, shape, dtype, fortran, raw = obj._ph_state
            if isinstance(raw, (bytes, bytearray)):
                arr = np.frombuffer(raw, dtype=_numpy_dtype(dtype)).reshape(shape, order="F" if fortran else "C")
                return arr.tolist()
            if isinstance(raw, list):  # object arrays keep their items as a list
                return raw
    except (ImportError, TypeError, ValueError, IndexError):
        return None
    return None


def _numpy_dtype(dtype: Any) -> Any:
    import numpy as np

    if isinstance(dtype, Placeholder) and dtype._ph_args and isinstance(dtype._ph_args[0], str):
        descr = dtype._ph_args[0]
        if descr == "O":
            raise TypeError("object dtype")
        order = dtype._ph_state[1] if isinstance(dtype._ph_state, tuple) and len(dtype._ph_state) > 1 else "|"
        return np.dtype(descr).newbyteorder(">" if order == ">" else "<") if order in "<>" else np.dtype(descr)
    raise TypeError("not a NumPy dtype")


def _module_state_dict(state: Mapping, prefix: str, out: dict, depth: int, limits: Limits) -> None:
    if depth > limits.max_depth:
        raise PickleLimitError(f"modules nested deeper than {limits.max_depth} levels")
    for name, value in (state.get("_parameters") or {}).items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{name}"] = value.detach()
    skip = state.get("_non_persistent_buffers_set") or ()
    skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
    for name, value in (state.get("_buffers") or {}).items():
        if isinstance(value, torch.Tensor) and name not in skip:
            out[f"{prefix}{name}"] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Placeholder) and isinstance(child._ph_state, Mapping):
            _module_state_dict(child._ph_state, f"{prefix}{name}.", out, depth + 1, limits)


def _is_module_state(state: Any) -> bool:
    return isinstance(state, Mapping) and "_modules" in state and "_parameters" in state


def to_plain(obj: Any, limits: Limits = DEFAULT_LIMITS) -> Any:
    """``obj`` as tensors and plain data: every placeholder replaced, each shared object converted once.

    A pickled ``nn.Module`` becomes its state dict (an ``OrderedDict`` of tensors); a dict subclass its items; a
    list subclass its items; NumPy scalars and arrays numbers and lists; any other object its recorded state
    (``__dict__``), else its constructor arguments, with its class name under ``"__class__"``; a class or function
    stored as a value becomes ``{"__global__": its qualified name}``. Shared references stay shared (a memo), so a
    small file cannot expand into an exponentially large structure.

    Raises:
        PickleLimitError: nesting deeper than ``limits.max_depth``.
    """
    return _Plain(limits).convert(obj, 0)


class _Plain:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.memo: dict[int, Any] = {}
        self.keep: list[Any] = []  # keeps converted sources alive so ids in the memo stay unique

    def convert(self, obj: Any, depth: int) -> Any:
        if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device)):
            return obj
        if id(obj) in self.memo:
            return self.memo[id(obj)]
        if depth > self.limits.max_depth:
            raise PickleLimitError(f"the checkpoint nests data deeper than {self.limits.max_depth} levels")
        self.keep.append(obj)
        if is_placeholder_class(obj):  # a class or function stored as a value
            return self._done(obj, {"__global__": obj._ph_name})
        if isinstance(obj, Placeholder):
            return self._placeholder(obj, depth)
        if isinstance(obj, Mapping):
            out = OrderedDict() if isinstance(obj, OrderedDict) else {}
            self.memo[id(obj)] = out  # before the items: a cycle refers back to it
            for k, v in obj.items():
                out[self.convert(k, depth + 1)] = self.convert(v, depth + 1)
            return out
        if isinstance(obj, list):
            out_list: list[Any] = []
            self.memo[id(obj)] = out_list
            out_list.extend(self.convert(v, depth + 1) for v in obj)
            return out_list
        if isinstance(obj, tuple):
            return self._done(obj, tuple(self.convert(v, depth + 1) for v in obj))
        if isinstance(obj, (set, frozenset)):
            return self._done(obj, type(obj)(self.convert(v, depth + 1) for v in obj))
        return obj

    def _done(self, obj: Any, value: Any) -> Any:
        self.memo[id(obj)] = value
        return value

    def _placeholder(self, obj: Placeholder, depth: int) -> Any:
        if _is_module_state(obj._ph_state):
            out: OrderedDict[str, torch.Tensor] = OrderedDict()
            _module_state_dict(obj._ph_state, "", out, depth, self.limits)
            return self._done(obj, out)
        value = _numpy_value(obj)
        if value is not None:
            return self._done(obj, value)
        if obj._ph_items:
            return self._done(obj, self.convert(obj._ph_items, depth + 1))
        if obj._ph_list:
            return self._done(obj, self.convert(obj._ph_list, depth + 1))
        state = obj._ph_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], Mapping):  # (dict, slots)
            state = {**(state[0] if isinstance(state[0], Mapping) else {}), **state[1]}
        out_dict: dict[str, Any] = {"__class__": obj._ph_name}
        self.memo[id(obj)] = out_dict
        if isinstance(state, Mapping):
            out_dict.update((str(k), self.convert(v, depth + 1)) for k, v in state.items())
        else:
            out_dict["args"] = self.convert(list(obj._ph_args), depth + 1)
            if state is not None:
                out_dict["state"] = self.convert(state, depth + 1)
        return out_dict
