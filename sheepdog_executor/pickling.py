"""The one place the client serialises what it sends to the nodes.

The nodes have only a Python interpreter, so functions and classes of the user's own modules (a
script's sibling module, a test file, a notebook helper) must travel by value, wherever they sit:
the submitted function, or deep inside its arguments (a dask graph, a ``functools.partial``). A
pickler that meets such an object registers its module with cloudpickle for pickling by value
before cloudpickle decides how to pickle it. Installed modules (stdlib, site-packages) are still
pickled by reference and must be importable on the nodes.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

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


def dumps(obj: Any) -> bytes:
    """cloudpickle ``obj``, shipping the user's modules by value (plain data takes the C pickler)."""
    if _plain(obj):
        return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
    return buffer.getvalue()


def dump_function(fn: Callable[..., Any]) -> tuple[str, bytes]:
    """(key, pickle) of a function; equal pickles share a key, so a worker receives each once."""
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    blob = dumps(fn)
    return hashlib.sha256(blob).hexdigest()[:32], blob
