"""The one place the client serialises what it sends to the nodes.

The nodes have only a Python interpreter, so functions and classes of the user's own modules (a
script's sibling module, a test file, a notebook helper) must travel by value, wherever they sit:
the submitted function, or deep inside its arguments (a dask graph, a ``functools.partial``). A
pickler that meets such an object registers its module with cloudpickle for pickling by value
before cloudpickle decides how to pickle it. Installed modules (stdlib, site-packages) are still
pickled by reference and must be importable on the nodes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import sys
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any

import cloudpickle

from sheepdog_executor.errors import PicklingFailed
from sheepdog_executor.remote.protocol import PICKLE_PROTOCOL

#: Modules already looked at, and those of them shipped by value.
_SEEN: set[str] = set()
SHIPPED: set[str] = set()


def _installed_prefixes() -> set[str]:
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    prefixes |= {os.path.realpath(p) for p in sys.path if "site-packages" in p or "dist-packages" in p}
    return prefixes


def ship_user_module(name: str | None) -> None:
    """Have cloudpickle pickle module ``name`` by value if it is the user's own (not installed)."""
    if not name or name in _SEEN:
        return
    _SEEN.add(name)
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if module is None or not path or name.split(".")[0] == "sheepdog_executor":
        return
    real = os.path.realpath(path)
    if not any(real.startswith(prefix + os.sep) for prefix in _installed_prefixes()):
        cloudpickle.register_pickle_by_value(module)
        SHIPPED.add(name)


class _Pickler(cloudpickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            ship_user_module(getattr(obj, "__module__", None))
        return super().reducer_override(obj)


_SCALARS = frozenset({int, float, complex, str, bytes, bool, type(None)})


def _plain(obj: Any, depth: int = 0) -> bool:
    """Only built-in scalars in small tuples, lists and str-keyed dicts: the C pickler suffices.
    (Loops written out: this runs once per call on ``map``'s hot path.)"""
    kind = type(obj)
    if kind in _SCALARS:
        return True
    if depth > 2:
        return False
    if kind is tuple or kind is list:
        if len(obj) > 32:
            return False
        for item in obj:
            if type(item) not in _SCALARS and not _plain(item, depth + 1):
                return False
        return True
    if kind is dict:
        if len(obj) > 32:
            return False
        for key, value in obj.items():
            if type(key) is not str or (type(value) not in _SCALARS and not _plain(value, depth + 1)):
                return False
        return True
    return False


def dumps(obj: Any, what: str = "the arguments", root: str = "(args, kwargs)") -> bytes:
    """cloudpickle ``obj``, shipping the user's modules by value (plain data takes the C pickler).

    What cannot be pickled raises PicklingFailed naming the object that failed and where it sits
    inside ``obj``: ``what`` says what ``obj`` is, ``root`` names it at the start of that path."""
    if _plain(obj):
        return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
    except (RecursionError, MemoryError):
        raise
    except Exception as exc:
        raise _explain(obj, what, root, exc) from exc
    return buffer.getvalue()


def _pickles(obj: Any) -> bool:
    try:
        _Pickler(io.BytesIO(), protocol=PICKLE_PROTOCOL).dump(obj)
    except Exception:  # noqa: BLE001 - any failure means "not this one"
        return False
    return True


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """(path suffix, part) of what pickling ``obj`` pickles, as far as it can be told from outside."""
    if isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=True):
            try:
                yield f" -> closure variable {name!r}", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        for name in dict.fromkeys(_global_names(obj.__code__)):
            if name in obj.__globals__:
                yield f" -> global {name!r}", obj.__globals__[name]
        for index, default in enumerate(obj.__defaults__ or ()):
            yield f".__defaults__[{index}]", default
    elif isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
    elif isinstance(obj, functools.partial):
        yield ".func", obj.func
        yield ".args", obj.args
        yield ".keywords", obj.keywords
    elif isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield f"[{index}]", item
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield f"[{key!r}]", value
    elif isinstance(obj, (set, frozenset)):
        for item in obj:
            yield " -> an item", item
    else:
        for name, value in getattr(obj, "__dict__", {}).items():
            yield f".{name}", value


def _explain(obj: Any, what: str, root: str, error: Exception) -> PicklingFailed:
    """Follow the parts that fail to pickle down to the innermost one, and say what it is."""
    path, chain, seen = root, [obj], {id(obj)}
    paths = [root]
    for _ in range(50):
        for suffix, part in _parts(chain[-1]):
            if id(part) not in seen and not _pickles(part):
                seen.add(id(part))
                path += suffix
                chain.append(part)
                paths.append(path)
                break
        else:
            break
    message = (
        f"cannot send {what} to the nodes: {path} ({type(chain[-1]).__qualname__}) cannot be pickled "
        f"({error})"
    )
    executors = [(p, o) for p, o in zip(paths, chain, strict=True) if isinstance(o, Executor)]
    if executors:
        where, executor = executors[0]
        message += (
            f"; {where} is a {type(executor).__qualname__}, and an executor cannot travel to the nodes "
            "(it holds this process's threads, locks and connections): submit from the client only, "
            "and pass the calls plain data"
        )
    else:
        message += (
            "; locks, threads, open files, sockets and connections exist only in this process: "
            "create them inside the call instead, or pass the data they guard"
        )
    return PicklingFailed(message)


def dump_function(fn: Callable[..., Any]) -> tuple[str, bytes]:
    """(key, pickle) of a function; equal pickles share a key, so a worker receives each once."""
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    name = str(getattr(fn, "__qualname__", type(fn).__qualname__))
    blob = dumps(fn, f"the function {name}", name)
    return hashlib.sha256(blob).hexdigest()[:32], blob
