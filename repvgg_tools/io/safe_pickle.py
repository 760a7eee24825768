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

:func:`repvgg_tools.io.plain.to_plain` then turns what was read into tensors and plain data, copying shared
references once (a memo), so placeholders never leave the reading code. The rules themselves (allowlist, validated
calls, placeholders, limits) are in :mod:`repvgg_tools.io.pickle_rules`.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import pickle
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .pickle_rules import (
    DEFAULT_LIMITS,
    NEWOBJ_CLASSES,
    REFUSED_MODULES,
    VALUE_CONSTRUCTORS,
    Limits,
    PickleLimitError,
    Placeholder,
    UnsafePickleError,
    allowed_calls,
    allowed_values,
    is_allowed_call,
    is_placeholder_class,
    placeholder_class,
)

__all__ = ["SafeUnpickler", "UnsafePickleError", "PickleLimitError", "Limits", "Placeholder"]


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
                 encoding: str = "utf-8", limits: Limits = DEFAULT_LIMITS) -> None:
        self._read, self._readline = file.read, file.readline
        self._persistent_load = persistent_load
        self.encoding, self.limits = encoding, limits
        self.replaced: set[str] = set()
        self._classes: dict[str, type] = {}
        self._objects = self._bytes = 0
        self._calls = allowed_calls(self._classes)
        self._values = allowed_values()

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
        if module.split(".")[0] in REFUSED_MODULES:
            raise UnsafePickleError(full, called=False)
        if full not in self._classes:
            looks_like_class = name.lstrip("_")[:1].isupper() or full in VALUE_CONSTRUCTORS
            self._classes[full] = placeholder_class(full, constructible=looks_like_class)
            self.replaced.add(full)
        return self._classes[full]

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("REDUCE arguments must be a tuple")
        if is_placeholder_class(func):
            return func(*args)  # inert instance, or refused for a function
        if is_allowed_call(func):
            try:
                return func(*args)
            except (pickle.UnpicklingError, EOFError):
                raise
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise pickle.UnpicklingError(f"bad arguments in the pickle ({exc})") from None
        raise UnsafePickleError(getattr(func, "__qualname__", type(func).__name__), called=True)

    def _newobj(self, cls: Any, args: Any) -> Any:
        if is_placeholder_class(cls):
            if not isinstance(args, tuple):
                raise pickle.UnpicklingError("NEWOBJ arguments must be a tuple")
            return cls.__new__(cls, *args)
        if isinstance(cls, type) and cls in NEWOBJ_CLASSES:
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
