"""A pickle reader for the training files people really have, under the rules of ``torch.load(weights_only=True)``.

``weights_only=True`` refuses real training files: the official RepVGG ``main.py`` saves its yacs ``CfgNode``,
mmengine (MMPretrain, MMDetection) a ``message_hub`` of ``HistoryBuffer`` objects holding NumPy arrays, timm's
``train.py`` an ``argparse.Namespace``, YOLOv6 whole model objects. :class:`SafeUnpickler` reads them without ever
importing a module or running code from the file. It is an interpreter of pickle's opcodes written in Python (not a
subclass of ``pickle.Unpickler``, whose BUILD and memo cannot be restricted), and it keeps weights_only's rules:

- GLOBAL yields an allowlisted object (the rebuild functions, dtypes and storage types torch needs, plain builtin
  types), else an inert :class:`Placeholder` class; modules that only exist to run code (``os``, ``subprocess``,
  ``builtins`` beyond plain types, ...) are refused even as values;
- REDUCE/NEWOBJ call only the exact allowlisted functions, with their arguments validated, or build an inert
  placeholder; a call of any other function is refused, naming it; ``getattr`` on a placeholder yields a placeholder
  and a real ``getattr`` is never called;
- BUILD only fills placeholders, tensors without state and the ``__dict__`` of an ``OrderedDict`` (state dicts'
  ``_metadata``): never an attribute of a real class or function;
- the memo is a dict, and objects, bytes and nesting depth are bounded (:class:`Limits`), each refused in one line.

:func:`to_plain` then turns what was read into tensors and plain data, copying shared references once (a memo), so
placeholders never leave the reading code: dict-like objects become dicts, objects their recorded state, NumPy values
numbers and lists, and a pickled ``nn.Module`` its state dict.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import pickle
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["UnsafePickleError", "PickleLimitError", "Limits", "Placeholder", "SafeUnpickler", "to_plain"]

# modules whose globals only exist to run code or reach the interpreter: refused outright, even as values
_REFUSED_MODULES = frozenset((
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code", "codeop",
    "pickle", "_pickle", "marshal", "ctypes", "webbrowser", "types", "builtins", "__builtin__", "operator",
    "functools", "inspect", "multiprocessing", "threading", "signal", "platform", "tempfile", "io", "_io", "posixpath",
    "ntpath", "glob", "copyreg", "_codecs", "codecs", "gc", "weakref",
    "abc", "contextlib", "asyncio", "sqlite3", "zipfile", "tarfile", "urllib", "http", "ftplib", "smtplib", "pdb",
    "bdb", "trace", "timeit", "cProfile", "profile", "site", "sysconfig", "distutils", "setuptools", "pip", "email",
))
# lowercase names that are classes (or inert value constructors) in the wild; called, they build a placeholder
_VALUE_CONSTRUCTORS = frozenset((
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


def _placeholder_class(name: str, constructible: bool) -> type:
    module, _, qualname = name.rpartition(".")
    return _PlaceholderType(qualname, (Placeholder,), {"_ph_name": name, "_ph_constructible": constructible,
                                                       "__module__": f"placeholder:{module}"})


def _is_placeholder_class(obj: Any) -> bool:
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


def _allowed_values() -> dict[str, Any]:
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
_NEWOBJ_CLASSES = {OrderedDict: OrderedDict, Counter: Counter, set: set, frozenset: frozenset, dict: dict, list: list}


class _Getattr:
    """``builtins.getattr`` as a pickle uses it (an attribute of a class stored by reference, a bound method): on a
    placeholder it yields a placeholder named after the attribute; a real ``getattr`` is never called."""

    def __init__(self, classes: dict[str, type]) -> None:
        self._classes = classes

    def __call__(self, obj: Any, name: Any, *default: Any) -> Any:
        if not isinstance(name, str) or not (_is_placeholder_class(obj) or isinstance(obj, Placeholder)):
            raise UnsafePickleError(f"builtins.getattr on {type(obj).__name__}", called=True)
        full = f"{obj._ph_name}.{name}"
        if full not in self._classes:
            self._classes[full] = _placeholder_class(full, name.lstrip("_")[:1].isupper())
        return self._classes[full]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects) for placeholders only."""
    if _is_placeholder_class(cls):
        obj = cls.__new__(cls)
        if state is not None:
            object.__setattr__(obj, "_ph_state", state)
        return obj
    raise UnsafePickleError(f"copyreg._reconstructor for {cls!r:.60}", called=True)


# ------------------------------------------------------------------------------------------------------ reader
_MARK = object()


class SafeUnpickler:
    """Read one pickle under the rules in the module docstring.

    Args:
        file: a binary file object.
        persistent_load: resolves persistent ids (the storages of a torch zip file); refused when ``None``.
        encoding: how to decode Python 2 ``str`` (``"bytes"`` keeps bytes).
        limits: the bounds (:class:`Limits`).

    ``replaced`` collects the qualified names of the classes read as placeholders.
    """

    def __init__(self, file: io.BufferedIOBase, persistent_load: Callable[[Any], Any] | None = None, *,
                 encoding: str = "utf-8", limits: Limits = Limits()) -> None:
        self._read, self._readline = file.read, file.readline
        self._persistent_load = persistent_load
        self.encoding, self.limits = encoding, limits
        self.replaced: set[str] = set()
        self._classes: dict[str, type] = {}
        self._objects = self._bytes = 0
        self._calls = {**_CALLS, "builtins.getattr": _Getattr(self._classes),
                       "copyreg._reconstructor": _reconstructor}
        self._values = _allowed_values()

    # ---- reading primitives
    def _take(self, n: int) -> bytes:
        self._bytes += n
        if self._bytes > self.limits.max_bytes:
            raise PickleLimitError(f"the pickle holds more than {self.limits.max_bytes} bytes of strings")
        data = self._read(n)
        if len(data) != n:
            raise EOFError("pickle data was truncated")
        return data

    def _line(self) -> bytes:
        line = self._readline(1 << 16)
        if not line.endswith(b"\n"):
            raise EOFError("pickle data was truncated")
        return line[:-1]

    def _count(self, n: int = 1) -> None:
        self._objects += n
        if self._objects > self.limits.max_objects:
            raise PickleLimitError(f"the pickle builds more than {self.limits.max_objects} objects")

    # ---- globals and calls
    def find_class(self, module: str, name: str) -> Any:
        """An allowlisted object, else an inert placeholder class; code-running modules are refused."""
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("GLOBAL names must be strings")
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names of protocol-2 pickles
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self._calls:
            return self._calls[full]
        if full in self._values:
            return self._values[full]
        if module.split(".")[0] in _REFUSED_MODULES:
            raise UnsafePickleError(full, called=False)
        if full not in self._classes:
            looks_like_class = name.lstrip("_")[:1].isupper() or full in _VALUE_CONSTRUCTORS
            self._classes[full] = _placeholder_class(full, constructible=looks_like_class)
            self.replaced.add(full)
        return self._classes[full]

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("REDUCE arguments must be a tuple")
        if _is_placeholder_class(func):
            return func(*args)  # inert instance, or refused for a function
        if id(func) in _CALLABLE_IDS or isinstance(func, _Getattr) or func is _reconstructor:
            try:
                return func(*args)
            except (pickle.UnpicklingError, EOFError):
                raise
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise pickle.UnpicklingError(f"bad arguments in the pickle ({exc})") from None
        raise UnsafePickleError(getattr(func, "__qualname__", type(func).__name__), called=True)

    def _newobj(self, cls: Any, args: Any) -> Any:
        if _is_placeholder_class(cls):
            if not isinstance(args, tuple):
                raise pickle.UnpicklingError("NEWOBJ arguments must be a tuple")
            return cls.__new__(cls, *args)
        if isinstance(cls, type) and cls in _NEWOBJ_CLASSES:
            return cls()
        raise UnsafePickleError(f"{getattr(cls, '__qualname__', cls)!r:.60} (NEWOBJ)", called=True)

    @staticmethod
    def _build(inst: Any, state: Any) -> None:
        if isinstance(inst, Placeholder):
            object.__setattr__(inst, "_ph_state", state)
        elif type(inst) is OrderedDict and isinstance(state, dict) and all(
                isinstance(k, str) and not k.startswith("__") for k in state):
            inst.__dict__.update(state)  # a state dict's ``_metadata``; no attribute of a class is touched
        elif isinstance(inst, torch.Tensor) and not state:
            pass
        else:
            raise UnsafePickleError(f"BUILD (setting the state) of a {type(inst).__name__}", called=True)

    # ---- the interpreter
    def load(self) -> Any:  # noqa: C901 - one branch per opcode is the clearest form
        """Read the pickle; returns the object.

        Raises:
            UnsafePickleError: a call, build or global that the rules refuse.
            PickleLimitError: past :class:`Limits`.
            pickle.UnpicklingError, EOFError: malformed or truncated data.
        """
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        take, line = self._take, self._line

        def pop_mark() -> list[Any]:
            if not marks:
                raise pickle.UnpicklingError("MARK expected")
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            return items

        def top() -> Any:
            if not stack or (marks and len(stack) <= marks[-1]):
                raise pickle.UnpicklingError("stack underflow")
            return stack[-1]

        def pop() -> Any:
            top()
            return stack.pop()

        def push(obj: Any) -> None:
            self._count()
            stack.append(obj)

        def setitems(target: Any, pairs: list[Any]) -> None:
            if isinstance(target, Placeholder):
                target = target._ph_items
            elif type(target) not in (dict, OrderedDict, Counter):
                raise pickle.UnpicklingError(f"SETITEM on a {type(target).__name__}")
            for i in range(0, len(pairs) - 1, 2):
                target[pairs[i]] = pairs[i + 1]

        def appends(target: Any, items: list[Any]) -> None:
            if isinstance(target, Placeholder):
                target = target._ph_list
            elif type(target) is not list:
                raise pickle.UnpicklingError(f"APPEND on a {type(target).__name__}")
            target.extend(items)

        def decode(raw: bytes) -> Any:
            return raw if self.encoding == "bytes" else raw.decode(self.encoding, "strict")

        while True:
            op = self._read(1)
            if not op:
                raise EOFError("pickle data was truncated")
            c = op[0]
            if c == 0x80:  # PROTO
                if take(1)[0] > 5:
                    raise pickle.UnpicklingError("unsupported pickle protocol")
            elif c == 0x95:  # FRAME: a size hint only
                take(8)
            elif c == 0x2E:  # STOP
                return pop()
            elif c == 0x28:  # MARK
                marks.append(len(stack))
            elif c == 0x30:  # POP
                if marks and len(stack) == marks[-1]:
                    marks.pop()
                else:
                    pop()
            elif c == 0x31:  # POP_MARK
                pop_mark()
            elif c == 0x32:  # DUP
                push(top())
            # ---- scalars
            elif c == 0x4E:  # NONE
                push(None)
            elif c == 0x88:
                push(True)
            elif c == 0x89:
                push(False)
            elif c == 0x4A:  # BININT
                push(struct.unpack("<i", take(4))[0])
            elif c == 0x4B:  # BININT1
                push(take(1)[0])
            elif c == 0x4D:  # BININT2
                push(struct.unpack("<H", take(2))[0])
            elif c == 0x8A:  # LONG1
                push(int.from_bytes(take(take(1)[0]), "little", signed=True))
            elif c == 0x8B:  # LONG4
                n = struct.unpack("<i", take(4))[0]
                if n < 0:
                    raise pickle.UnpicklingError("negative LONG4 size")
                push(int.from_bytes(take(n), "little", signed=True))
            elif c == 0x49:  # INT (text; 00/01 are booleans)
                text = line()
                push({b"00": False, b"01": True}.get(text) if text in (b"00", b"01") else int(text, 10))
            elif c == 0x4C:  # LONG (text)
                push(int(line().rstrip(b"L"), 10))
            elif c == 0x46:  # FLOAT (text)
                push(float(line()))
            elif c == 0x47:  # BINFLOAT
                push(struct.unpack(">d", take(8))[0])
            # ---- strings and bytes
            elif c == 0x58:  # BINUNICODE
                push(str(take(struct.unpack("<I", take(4))[0]), "utf-8", "surrogatepass"))
            elif c == 0x8C:  # SHORT_BINUNICODE
                push(str(take(take(1)[0]), "utf-8", "surrogatepass"))
            elif c == 0x8D:  # BINUNICODE8
                push(str(take(struct.unpack("<Q", take(8))[0]), "utf-8", "surrogatepass"))
            elif c == 0x56:  # UNICODE (text)
                push(str(line(), "raw-unicode-escape"))
            elif c == 0x55:  # SHORT_BINSTRING
                push(decode(take(take(1)[0])))
            elif c == 0x54:  # BINSTRING
                n = struct.unpack("<i", take(4))[0]
                if n < 0:
                    raise pickle.UnpicklingError("negative BINSTRING size")
                push(decode(take(n)))
            elif c == 0x53:  # STRING (text, quoted)
                text = line()
                if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b"'", b'"'):
                    raise pickle.UnpicklingError("the STRING opcode argument must be quoted")
                push(decode(codecs.escape_decode(text[1:-1])[0]))
            elif c == 0x42:  # BINBYTES
                push(take(struct.unpack("<I", take(4))[0]))
            elif c == 0x43:  # SHORT_BINBYTES
                push(take(take(1)[0]))
            elif c == 0x8E:  # BINBYTES8
                push(take(struct.unpack("<Q", take(8))[0]))
            elif c == 0x96:  # BYTEARRAY8
                push(bytearray(take(struct.unpack("<Q", take(8))[0])))
            # ---- containers
            elif c == 0x5D:  # EMPTY_LIST
                push([])
            elif c == 0x29:  # EMPTY_TUPLE
                push(())
            elif c == 0x7D:  # EMPTY_DICT
                push({})
            elif c == 0x8F:  # EMPTY_SET
                push(set())
            elif c == 0x6C:  # LIST
                push(pop_mark())
            elif c == 0x74:  # TUPLE
                push(tuple(pop_mark()))
            elif c in (0x85, 0x86, 0x87):  # TUPLE1..3
                n = c - 0x84
                if len(stack) < n or (marks and len(stack) - n < marks[-1]):
                    raise pickle.UnpicklingError("stack underflow")
                items = tuple(stack[-n:])
                del stack[-n:]
                push(items)
            elif c == 0x64:  # DICT
                items = pop_mark()
                d: dict = {}
                setitems(d, items)
                push(d)
            elif c == 0x91:  # FROZENSET
                push(frozenset(pop_mark()))
            elif c == 0x61:  # APPEND
                item = pop()
                appends(top(), [item])
            elif c == 0x65:  # APPENDS
                items = pop_mark()
                appends(top(), items)
            elif c == 0x73:  # SETITEM
                value, key = pop(), pop()
                setitems(top(), [key, value])
            elif c == 0x75:  # SETITEMS
                items = pop_mark()
                setitems(top(), items)
            elif c == 0x90:  # ADDITEMS
                items = pop_mark()
                target = top()
                if type(target) is not set:
                    raise pickle.UnpicklingError(f"ADDITEMS on a {type(target).__name__}")
                target.update(items)
            # ---- memo
            elif c in (0x71, 0x72, 0x70, 0x94):  # BINPUT, LONG_BINPUT, PUT, MEMOIZE
                index = (take(1)[0] if c == 0x71 else struct.unpack("<I", take(4))[0] if c == 0x72
                         else int(line()) if c == 0x70 else len(memo))
                memo[index] = top()
            elif c in (0x68, 0x6A, 0x67):  # BINGET, LONG_BINGET, GET
                index = (take(1)[0] if c == 0x68 else struct.unpack("<I", take(4))[0] if c == 0x6A else int(line()))
                if index not in memo:
                    raise pickle.UnpicklingError(f"memo entry {index} not found")
                push(memo[index])
            # ---- globals, calls, state
            elif c == 0x63:  # GLOBAL
                module = line().decode("utf-8")
                push(self.find_class(module, line().decode("utf-8")))
            elif c == 0x93:  # STACK_GLOBAL
                name, module = pop(), pop()
                push(self.find_class(module, name))
            elif c == 0x52:  # REDUCE
                args, func = pop(), pop()
                push(self._call(func, args))
            elif c == 0x81:  # NEWOBJ
                args, cls = pop(), pop()
                push(self._newobj(cls, args))
            elif c == 0x92:  # NEWOBJ_EX
                kwargs, args, cls = pop(), pop(), pop()
                if kwargs:
                    raise UnsafePickleError("NEWOBJ_EX with keyword arguments", called=True)
                push(self._newobj(cls, args))
            elif c == 0x69:  # INST (protocol 0): module, name, arguments after MARK
                module, name = line().decode("utf-8"), line().decode("utf-8")
                args = tuple(pop_mark())
                push(self._call(self.find_class(module, name), args))
            elif c == 0x6F:  # OBJ (protocol 1): class and arguments after MARK
                items = pop_mark()
                if not items:
                    raise pickle.UnpicklingError("OBJ without a class")
                push(self._call(items[0], tuple(items[1:])))
            elif c == 0x62:  # BUILD
                state = pop()
                self._build(top(), state)
            elif c in (0x51, 0x50):  # BINPERSID, PERSID
                pid = pop() if c == 0x51 else line().decode("ascii")
                if self._persistent_load is None:
                    raise pickle.UnpicklingError("persistent ids are not supported here")
                push(self._persistent_load(pid))
            else:  # EXT1/2/4, NEXT_BUFFER, READONLY_BUFFER, anything unknown
                raise pickle.UnpicklingError(f"unsupported pickle opcode {op!r}")


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


def to_plain(obj: Any, limits: Limits = Limits()) -> Any:
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
        if _is_placeholder_class(obj):  # a class or function stored as a value
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
