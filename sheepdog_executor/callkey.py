"""A call's key in a sweep: a hash of its function's code and its arguments' values, the same in
every process (no ``id``, no ``hash()`` of strings, no pickle memo order), that changes when the
function's body, a value it closes over or a global it reads, or an argument changes.

Hashed by value: None, bools, numbers, strings, bytes, tuples, lists, dicts, sets, numpy arrays and
scalars, dataclasses, enums, functions (code, defaults, closure, the globals they read), partials,
methods, classes and modules (by name). Anything else by its plain pickle; an argument that has
none raises ``SweepKeyError``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import pickle
import struct
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

from sheepdog_executor.errors import SweepKeyError

_VERSION = b"sheepdog-sweep-key-1"
_functions: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def function_digest(fn: Callable[..., Any]) -> bytes:
    """The digest of a function's code and of what it reads (cached while ``fn`` lives)."""
    try:
        known = _functions.get(fn)
    except TypeError:  # not weakly referable
        known = None
    if known is not None:
        return known
    digest = _Digest(lenient=False).of(fn)
    try:
        _functions[fn] = digest
    except TypeError:
        pass
    return digest


def call_key(fn_digest: bytes, args: Any, kwargs: Any) -> str:
    """The key (64 hex digits) of a call of the function of ``fn_digest``."""
    digest = _Digest(lenient=False)
    return hashlib.sha256(_VERSION + fn_digest + digest.of(args) + digest.of(kwargs or {})).hexdigest()


class _Digest:
    """SHA-256 of a value's canonical encoding. ``lenient``: a value that cannot be hashed counts by
    its type alone, instead of raising (only for the globals a function reads)."""

    def __init__(self, lenient: bool) -> None:
        self.lenient = lenient
        self._open: dict[int, int] = {}  # ids of the values being hashed (cycles), by depth

    def of(self, value: Any) -> bytes:
        marker = self._open.get(id(value))
        if marker is not None:  # a cycle: a function that calls itself through its globals
            return hashlib.sha256(b"cycle" + str(marker).encode()).digest()
        self._open[id(value)] = len(self._open)
        try:
            return hashlib.sha256(self._encode(value)).digest()
        finally:
            del self._open[id(value)]

    def _many(self, tag: bytes, values: Any) -> bytes:
        return tag + b"".join(self.of(v) for v in values)

    def _encode(self, value: Any) -> bytes:
        kind = type(value)
        if value is None or kind is bool:
            return b"c" + repr(value).encode()
        if kind is int:
            return b"i" + str(value).encode()
        if kind is float:
            return b"f" + struct.pack("<d", value)
        if kind is complex:
            return b"j" + struct.pack("<dd", value.real, value.imag)
        if kind is str:
            return b"s" + value.encode("utf-8", "surrogatepass")
        if kind in (bytes, bytearray):
            return b"b" + bytes(value)
        if kind in (tuple, list):
            return self._many(b"t" if kind is tuple else b"l", value)
        if kind is dict:
            pairs = sorted(self.of(k) + self.of(v) for k, v in value.items())
            return b"d" + b"".join(pairs)
        if kind in (set, frozenset):
            return b"S" + b"".join(sorted(self.of(v) for v in value))
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
            return self._numpy(value)
        if isinstance(value, enum.Enum):
            return b"e" + self._name(kind) + self.of(value.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
            return b"D" + self._name(kind) + self._many(b"", fields)
        if kind is types.FunctionType:
            return self._function(value)
        if kind is functools.partial:
            return b"p" + self.of(value.func) + self.of(value.args) + self.of(value.keywords)
        if kind is types.MethodType:
            return b"m" + self.of(value.__func__) + self.of(value.__self__)
        if kind is types.CodeType:
            return self._code(value)
        if kind is types.ModuleType:
            return b"M" + value.__name__.encode()
        if isinstance(value, type) or kind is types.BuiltinFunctionType:
            return b"T" + self._name(value)
        return self._pickled(value)

    @staticmethod
    def _name(kind: Any) -> bytes:
        return f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', '')}".encode()

    def _numpy(self, value: Any) -> bytes:
        import numpy

        array = numpy.asarray(value)
        head = f"{array.dtype.str}{array.shape}".encode()
        if array.dtype.hasobject:
            return b"o" + head + self.of(array.tolist())
        return b"n" + head + numpy.ascontiguousarray(array).tobytes()

    def _function(self, fn: types.FunctionType) -> bytes:
        names = sorted(_global_names(fn.__code__))
        found = [(name, fn.__globals__[name]) for name in names if name in fn.__globals__]
        cells = [_cell(cell) for cell in fn.__closure__ or ()]
        return (
            b"F"
            + self.of(fn.__code__)
            + self.of(fn.__defaults__)
            + self.of(fn.__kwdefaults__)
            + self.of(cells)
            + self._globals(found)
        )

    def _globals(self, found: list[tuple[str, Any]]) -> bytes:
        """The globals a function reads: one that cannot be hashed counts by its type alone (a
        lock, a logger, an open file at module level), so that a script's functions can be keyed."""
        lenient, self.lenient = self.lenient, True
        try:
            return self.of(found)
        finally:
            self.lenient = lenient

    def _code(self, code: types.CodeType) -> bytes:
        consts = [self.of(c) for c in code.co_consts]
        parts = (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)
        counts = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)
        return b"C" + pickle.dumps((parts, counts), protocol=4) + b"".join(consts)

    def _pickled(self, value: Any) -> bytes:
        try:
            return b"P" + self._name(type(value)) + pickle.dumps(value, protocol=4)
        except Exception as exc:  # noqa: BLE001 - locks, open files, sockets, local classes
            if self.lenient:
                return b"?" + self._name(type(value))
            raise SweepKeyError(
                f"a sweep cannot key a call with a value of type {type(value).__qualname__} in its "
                f"arguments or its function's closure (it has no plain pickle: {exc}); pass plain values "
                "(numbers, strings, tuples, lists, dicts, numpy arrays, dataclasses) or run this call "
                "without sweep="
            ) from exc


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if type(const) is types.CodeType:
            names |= _global_names(const)
    return names
