"""A restricted unpickler for the training files people really have, which ``weights_only=True`` refuses.

The official RepVGG ``main.py`` saves its yacs ``CfgNode`` under ``config``, mmengine (MMPretrain, MMDetection) saves a
``message_hub`` of ``HistoryBuffer`` objects holding NumPy arrays, timm's ``train.py`` saves ``args`` as an
``argparse.Namespace``, YOLOv6 saves whole model objects. Loading them with plain ``pickle`` would import those
packages and could run any code the file names. Here:

- tensors, storages and plain containers load as with ``weights_only=True`` (the same allowlist of globals);
- any other class becomes an inert :class:`Placeholder` that records its name, constructor arguments and state: no
  module is imported and no code of the class runs;
- a *call* of a non-allowlisted function (``os.system``, ``builtins.exec``, ``subprocess.check_output``, ...) is
  refused with :class:`UnsafePickleError` naming it; so is any global of a module that only exists to run code
  (``os``, ``subprocess``, ``builtins`` beyond plain types, ``importlib``, ...), even as a value.

:func:`to_plain` turns what was loaded into tensors and plain data (placeholders never leave this module's callers):
dict-like objects become dicts, objects become their recorded state, NumPy scalars and arrays become numbers and
lists, and a pickled ``nn.Module`` becomes its state dict.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["UnsafePickleError", "Placeholder", "RestrictedUnpickler", "restricted_pickle_module", "to_plain"]

# modules whose globals only exist to run code or reach the interpreter: refused outright, even as values
_REFUSED_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code", "codeop",
    "pickle", "_pickle", "marshal", "ctypes", "webbrowser", "types", "builtins", "__builtin__", "operator",
    "functools", "inspect", "multiprocessing", "threading", "signal", "platform", "tempfile",
)
# plain builtin types that are safe to construct (what a pickle of plain data may reference)
_SAFE_BUILTINS = {
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.bytearray": bytearray,
    "builtins.complex": complex, "builtins.slice": slice, "builtins.range": range,
}
# lowercase names that are classes (or inert value constructors) in the wild; called, they build a placeholder
_VALUE_CONSTRUCTORS = {
    "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "datetime.datetime",
    "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone", "collections.defaultdict",
    "collections.deque", "copyreg._reconstructor",
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle calls (or names) a function that is not on the allowlist; ``callable`` says which."""

    def __init__(self, name: str, called: bool) -> None:
        verb = "calls" if called else "references"
        super().__init__(f"the file {verb} {name}, which is not allowed (loading it could run arbitrary code)")
        self.callable = name


class _PlaceholderType(type):
    """Calling a placeholder class (pickle's REDUCE) builds an inert instance, or is refused for a function."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        if not cls._ph_constructible:
            raise UnsafePickleError(cls._ph_name, called=True)
        return cls.__new__(cls, *args)


class Placeholder(metaclass=_PlaceholderType):
    """An object of a class that was not imported: its qualified name, constructor arguments and state.

    Pickle fills it as it would the real object (``__new__`` arguments, ``__setstate__``, dict items, list items),
    and nothing else happens.
    """

    _ph_name = "?"
    _ph_constructible = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_ph_args", args)
        object.__setattr__(obj, "_ph_state", None)
        object.__setattr__(obj, "_ph_items", {})
        object.__setattr__(obj, "_ph_list", [])
        return obj

    def __setstate__(self, state: Any) -> None:
        object.__setattr__(self, "_ph_state", state)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._ph_items[key] = value

    def append(self, value: Any) -> None:
        self._ph_list.append(value)

    def extend(self, values: Any) -> None:
        self._ph_list.extend(values)

    def __repr__(self) -> str:
        return f"<placeholder {self._ph_name}>"


def _placeholder_class(name: str, constructible: bool) -> type:
    module, _, qualname = name.rpartition(".")
    return _PlaceholderType(qualname, (Placeholder,), {"_ph_name": name, "_ph_constructible": constructible,
                                                       "__module__": f"placeholder:{module}"})


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) without calling anything but a placeholder."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        obj = cls.__new__(cls)
        if state is not None:
            obj.__setstate__(state)
        return obj
    raise UnsafePickleError(f"copyreg._reconstructor for {cls!r}", called=True)


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    for obj in torch.serialization.get_safe_globals():  # what the user allowlisted for weights_only loading
        if not isinstance(obj, tuple):
            allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    allowed.update(_SAFE_BUILTINS)
    allowed["copyreg._reconstructor"] = _reconstructor
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` never imports: allowlisted globals, else placeholders.

    The names of the replaced classes are added to ``replaced`` (a set shared by the unpicklers of one load).
    """

    replaced: set[str] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._allowed = _allowed_globals()
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__.set``) that protocol-2 pickles use, as pickle's own find_class maps them
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module.split(".")[0] in _REFUSED_MODULES:
            raise UnsafePickleError(full, called=False)
        if full not in self._classes:
            looks_like_class = name.lstrip("_")[:1].isupper() or full in _VALUE_CONSTRUCTORS
            self._classes[full] = _placeholder_class(full, constructible=looks_like_class)
            self.replaced.add(full)
        return self._classes[full]


def restricted_pickle_module() -> tuple[types.ModuleType, set[str]]:
    """``(module, replaced)``: a module to pass as ``torch.load(..., pickle_module=module, weights_only=False)``,
    and the set that collects the qualified names of the classes it replaces by placeholders."""
    replaced: set[str] = set()
    unpickler = type("RestrictedUnpickler", (RestrictedUnpickler,), {"replaced": replaced})
    module = types.ModuleType("repvgg_tools_restricted_pickle")
    module.Unpickler = unpickler
    module.UnpicklingError = pickle.UnpicklingError
    module.load = lambda f, **kw: unpickler(f, **kw).load()
    return module, replaced


# --------------------------------------------------------------------------------------------- to plain data
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
    except (ImportError, TypeError, ValueError):
        return None
    return None


def _numpy_dtype(dtype: Any) -> Any:
    import numpy as np

    if isinstance(dtype, Placeholder) and dtype._ph_args and isinstance(dtype._ph_args[0], str):
        descr = dtype._ph_args[0]
        order = dtype._ph_state[1] if isinstance(dtype._ph_state, tuple) and len(dtype._ph_state) > 1 else "|"
        return np.dtype(descr).newbyteorder(">" if order == ">" else "<") if order in "<>" else np.dtype(descr)
    raise TypeError("not a NumPy dtype")


def _module_state_dict(state: Mapping, prefix: str, out: dict) -> None:
    for name, value in (state.get("_parameters") or {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value.detach()
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_buffers") or {}).items():
        if isinstance(value, torch.Tensor) and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, Placeholder) and isinstance(child._ph_state, Mapping):
            _module_state_dict(child._ph_state, f"{prefix}{name}.", out)


def _is_module_state(state: Any) -> bool:
    return isinstance(state, Mapping) and "_modules" in state and "_parameters" in state


def to_plain(obj: Any) -> Any:
    """``obj`` with every placeholder replaced by plain data; tensors and plain containers are kept as they are.

    A pickled ``nn.Module`` becomes its state dict (an ``OrderedDict`` of tensors); a dict subclass its items; a
    list subclass its items; NumPy scalars and arrays numbers and lists; any other object its recorded state
    (``__dict__``), else its constructor arguments, with its class name under ``"__class__"``; a class or function
    stored as a value becomes ``{"__global__": its qualified name}``.
    """
    if isinstance(obj, type) and issubclass(obj, Placeholder):  # a class or function stored as a value
        return {"__global__": obj._ph_name}
    if isinstance(obj, Placeholder):
        if _is_module_state(obj._ph_state):
            out: OrderedDict[str, torch.Tensor] = OrderedDict()
            _module_state_dict(obj._ph_state, "", out)
            return out
        value = _numpy_value(obj)
        if value is not None:
            return value
        if obj._ph_items:
            return {to_plain(k): to_plain(v) for k, v in obj._ph_items.items()}
        if obj._ph_list:
            return [to_plain(v) for v in obj._ph_list]
        state = obj._ph_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], Mapping):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, Mapping):
            return {"__class__": obj._ph_name, **{str(k): to_plain(v) for k, v in state.items()}}
        return {"__class__": obj._ph_name, "args": to_plain(list(obj._ph_args)),
                **({"state": to_plain(state)} if state is not None else {})}
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        plain = {to_plain(k): to_plain(v) for k, v in obj.items()}
        return OrderedDict(plain) if isinstance(obj, OrderedDict) else plain
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(to_plain(v) for v in obj)
    return obj
