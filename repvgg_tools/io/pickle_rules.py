"""The rules of :mod:`repvgg_tools.io.safe_pickle`: what a checkpoint's pickle may name, call and build.

The errors and bounds of the reader, the inert :class:`Placeholder` that stands for any class that is not imported,
and the allowlist: the globals that are values (dtypes, storage types), and the exact functions REDUCE may call, each
wrapped so its arguments are validated before torch's own rebuild function runs. ``getattr`` on a placeholder yields a
placeholder; a real ``getattr`` is never called.
"""

from __future__ import annotations

import codecs
import pickle
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "UnsafePickleError", "PickleLimitError", "Limits", "DEFAULT_LIMITS", "Placeholder", "placeholder_class",
    "is_placeholder_class", "reconstructor", "Getattr", "allowed_calls", "allowed_values", "is_allowed_call",
    "NEWOBJ_CLASSES", "REFUSED_MODULES", "VALUE_CONSTRUCTORS",
]

# modules whose globals only exist to run code or reach the interpreter: refused outright, even as values
REFUSED_MODULES = frozenset((
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code", "codeop",
    "pickle", "_pickle", "marshal", "ctypes", "webbrowser", "types", "builtins", "__builtin__", "operator",
    "functools", "inspect", "multiprocessing", "threading", "signal", "platform", "tempfile", "io", "_io", "posixpath",
    "ntpath", "glob", "copyreg", "_codecs", "codecs", "gc", "weakref",
    "abc", "contextlib", "asyncio", "sqlite3", "zipfile", "tarfile", "urllib", "http", "ftplib", "smtplib", "pdb",
    "bdb", "trace", "timeit", "cProfile", "profile", "site", "sysconfig", "distutils", "setuptools", "pip", "email",
))
# lowercase names that are classes (or inert value constructors) in the wild; called, they build a placeholder
VALUE_CONSTRUCTORS = frozenset((
    "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "datetime.datetime",
    "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone", "collections.defaultdict",
    "collections.deque",
))


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle calls (or names) a function that is not on the allowlist; ``callable`` says which."""

    def __init__(self, name: str, called: bool) -> None:
        verb = "calls" if called else "references"
        super().__init__(f"the file {verb} {name}, which is not allowed (loading it could run arbitrary code)")
        self.callable = name


class PickleLimitError(pickle.UnpicklingError):
    """The pickle builds more objects, bytes or nesting than :class:`Limits` allows."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what one pickle may build: objects created, bytes of strings and bytes read, nesting depth of
    the plain data (:func:`to_plain`). Real training files use a tiny fraction of each."""

    max_objects: int = 20_000_000
    max_bytes: int = 1 << 30
    max_depth: int = 200


DEFAULT_LIMITS = Limits()


# ------------------------------------------------------------------------------------------------- placeholders
class _PlaceholderType(type):
    """Calling a placeholder class (pickle's REDUCE) builds an inert instance, or is refused for a function."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        if not cls._ph_constructible:
            raise UnsafePickleError(cls._ph_name, called=True)
        return cls.__new__(cls, *args)


class Placeholder(metaclass=_PlaceholderType):
    """An object of a class that was not imported: its qualified name, constructor arguments and state.

    The reader fills it as pickle would fill the real object (``__new__`` arguments, state, dict items, list
    items), and nothing else happens: it has no behaviour of the class it stands for.
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

    def __setattr__(self, name: str, value: Any) -> None:  # state is recorded, never set as attributes
        raise AttributeError(f"placeholder {self._ph_name} is read-only")

    def __repr__(self) -> str:
        return f"<placeholder {self._ph_name}>"


def placeholder_class(name: str, constructible: bool) -> type:
    module, _, qualname = name.rpartition(".")
    return _PlaceholderType(qualname, (Placeholder,), {"_ph_name": name, "_ph_constructible": constructible,
                                                       "__module__": f"placeholder:{module}"})


def is_placeholder_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Placeholder)


# ------------------------------------------------------------------------------------ allowlisted calls, validated
def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(type(v) is int for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of integers, got {value!r:.80}")
    return tuple(value)


def _no_hooks(hooks: Any) -> None:
    if hooks not in (None, {}) and not (isinstance(hooks, OrderedDict) and not hooks):
        raise pickle.UnpicklingError("tensor backward hooks are not allowed in a checkpoint")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage) or type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError("a tensor must be rebuilt from a storage of the file and an offset >= 0")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} do not describe a view")
    _no_hooks(backward_hooks)
    if metadata:
        raise pickle.UnpicklingError("tensor metadata (conjugate/negative bits) is not allowed in a checkpoint")
    # torch checks that the view stays inside its storage (``set_`` raises otherwise)
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad), OrderedDict())


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if type(data) is not torch.Tensor:
        raise pickle.UnpicklingError("a parameter must wrap a plain tensor")
    _no_hooks(backward_hooks)
    if state:
        raise pickle.UnpicklingError("parameter attributes are not allowed in a checkpoint")
    return torch.nn.Parameter(data, bool(requires_grad))


_REBUILDS: dict[str, Callable] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDS.values() or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError("only plain tensors and parameters can be rebuilt")
    if state:
        raise pickle.UnpicklingError("tensor attributes are not allowed in a checkpoint")
    if not isinstance(args, tuple):
        raise pickle.UnpicklingError("bad tensor arguments")
    return func(*args)


def _codecs_encode(text, encoding="utf-8"):
    # how protocol 2 pickles bytes (NumPy buffers included): latin-1 text to bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode only on text with a plain encoding")
    return codecs.encode(text, encoding)


def _plain_call(cls: type, *types_: type) -> Callable:
    def call(*args):
        if len(args) > 2 or not all(isinstance(a, types_) for a in args):
            raise pickle.UnpicklingError(f"bad arguments for {cls.__name__}")
        return cls(*args)

    return call


def _ordered_dict(items=()):
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError("OrderedDict from a list of pairs only")
    return OrderedDict(items)


def _torch_size(dims=()):
    return torch.Size(_ints(dims, "size"))


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise pickle.UnpicklingError("bad device")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _get_layout(name):
    if not isinstance(name, str) or not name.startswith("torch."):
        raise pickle.UnpicklingError("bad layout")
    return torch.serialization._get_layout(name)


def allowed_values() -> dict[str, Any]:
    """Globals that are values (never called): dtypes, storage types, quantization schemes."""
    from torch import _weights_only_unpickler as wo

    values: dict[str, Any] = {"builtins.object": object, "builtins.dict": dict, "builtins.list": list}
    for name, obj in wo._get_allowed_globals().items():
        if isinstance(obj, torch.dtype) or isinstance(obj, torch.serialization.StorageType) \
                or obj in (torch.storage.TypedStorage, torch.storage.UntypedStorage) or isinstance(obj, torch.qscheme):
            values[name] = obj
    return values


_CALLS: dict[str, Callable] = {
    **_REBUILDS,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "torch.serialization._get_layout": _get_layout,
    "_codecs.encode": _codecs_encode,
    "builtins.set": _plain_call(set, list, tuple),
    "builtins.frozenset": _plain_call(frozenset, list, tuple),
    "builtins.bytearray": _plain_call(bytearray, bytes, str),
    "builtins.complex": _plain_call(complex, int, float),
    "builtins.slice": _plain_call(slice, int, type(None)),
}
# the callables among the allowed globals, for REDUCE
_CALLABLE_IDS = {id(f) for f in _CALLS.values()}
# real classes NEWOBJ may create (empty; items come through SETITEMS/APPENDS)
NEWOBJ_CLASSES = {OrderedDict: OrderedDict, Counter: Counter, set: set, frozenset: frozenset, dict: dict, list: list}


class Getattr:
    """``builtins.getattr`` as a pickle uses it (an attribute of a class stored by reference, a bound method): on a
    placeholder it yields a placeholder named after the attribute; a real ``getattr`` is never called."""

    def __init__(self, classes: dict[str, type]) -> None:
        self._classes = classes

    def __call__(self, obj: Any, name: Any, *default: Any) -> Any:
        if not isinstance(name, str) or not (is_placeholder_class(obj) or isinstance(obj, Placeholder)):
            raise UnsafePickleError(f"builtins.getattr on {type(obj).__name__}", called=True)
        full = f"{obj._ph_name}.{name}"
        if full not in self._classes:
            self._classes[full] = placeholder_class(full, name.lstrip("_")[:1].isupper())
        return self._classes[full]


def reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) for placeholders only."""
    if is_placeholder_class(cls):
        obj = cls.__new__(cls)
        if state is not None:
            object.__setattr__(obj, "_ph_state", state)
        return obj
    raise UnsafePickleError(f"copyreg._reconstructor for {cls!r:.60}", called=True)


def allowed_calls(classes: dict[str, type]) -> dict[str, Callable]:
    """The functions REDUCE may call, by qualified name; ``classes`` is the reader's table of placeholder classes
    (``getattr`` adds the attributes it names to it)."""
    return {**_CALLS, "builtins.getattr": Getattr(classes), "copyreg._reconstructor": reconstructor}


def is_allowed_call(func: Any) -> bool:
    """Whether ``func`` is one of :func:`allowed_calls`' functions (identity, never equality)."""
    return id(func) in _CALLABLE_IDS or isinstance(func, Getattr) or func is reconstructor

