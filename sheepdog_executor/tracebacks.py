"""Rebuild the exceptions calls raise on the nodes, give their tracebacks their source lines back,
and advice that fits this client.

cloudpickle rebuilds functions shipped by value with ``co_filename == "<dynamic-code>"``, so the
node cannot show their source. The client still has it: each such frame (function name and line
number) is matched to a code object of the modules shipped by value (and ``__main__``) that has
that name and that line, and the frame gets its file and source line back.
"""

from __future__ import annotations

import importlib.util
import linecache
import pickle
import re
import sys
import types
from collections.abc import Iterator

from sheepdog_executor.errors import RemoteCallError, RemoteTraceback
from sheepdog_executor.pickling import SHIPPED
from sheepdog_executor.remote.compat import add_note
from sheepdog_executor.remote.protocol import Error

#: The node's note on a missing module (remote/worker.py ``explain_missing_module``).
_MISSING_MODULE = re.compile(r"^sheepdog: .* is not importable on the nodes")
#: A frame as ``traceback`` writes it (``line 7, in f``) or as ``faulthandler`` does (``line 7 in f``).
_FRAME = re.compile(r'^  File "<dynamic-code>", line (\d+),? in (.+)$')


def _code_objects(value: object) -> Iterator[types.CodeType]:
    """Code objects of a function or class, nested ones (closures, lambdas) included."""
    if isinstance(value, type):
        for member in vars(value).values():
            yield from _code_objects(getattr(member, "__func__", member))
        return
    code = getattr(value, "__code__", None)
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        current = stack.pop()
        yield current
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))


def _find(name: str, lineno: int) -> types.CodeType | None:
    for module_name in ["__main__", *sorted(SHIPPED)]:
        module = sys.modules.get(module_name)
        for value in list(vars(module).values()) if module else []:
            if getattr(value, "__module__", None) != module_name:
                continue
            for code in _code_objects(value):
                if code.co_name == name and any(line == lineno for _, _, line in code.co_lines()):
                    return code
    return None


def restore_source(tb: str) -> str:
    """Replace ``<dynamic-code>`` frames by the client's file name and source line, when known."""
    if "<dynamic-code>" not in tb:
        return tb
    out: list[str] = []
    for line in tb.splitlines():
        match = _FRAME.match(line)
        if match:
            lineno, name = int(match.group(1)), match.group(2)
            code = _find(name, lineno)
            source = linecache.getline(code.co_filename, lineno).strip() if code else ""
            if code and source:
                line = f'  File "{code.co_filename}", line {lineno}, in {name}\n    {source}'
        out.append(line)
    return "\n".join(out) + "\n"


def fit_advice(error: BaseException, synced: bool) -> None:
    """Correct the node's advice on a missing module with what only the client knows: whether the
    module is installed here, and whether the executor already ships this client's packages
    (``synced``, ``environment="sync"``). The node's note is replaced in place."""
    notes = getattr(error, "__notes__", None)
    if not isinstance(error, ModuleNotFoundError) or not error.name or not isinstance(notes, list):
        return
    ours = [i for i, n in enumerate(notes) if isinstance(n, str) and _MISSING_MODULE.search(n)]
    if not ours:
        return
    index, note = ours[0], notes[ours[0]]
    top = error.name.partition(".")[0]
    try:
        here = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        here = None
    head = note.partition("; ")[0]
    if here is None:
        notes[index] = f"{head}; it is not installed here either: a typo?"
    elif synced:
        where = here.origin or (list(here.submodule_search_locations or []) or ["?"])[0]
        notes[index] = (
            f'{head}; environment="sync" is on and {top!r} is importable here ({where}), but it was '
            "not shipped: a module of no installed distribution is not (install it as a package, or "
            "put it in the working directory), nor one that environment_exclude names"
        )


def rebuild_error(sent: Error) -> BaseException:
    """The exception a call raised on a node (as the worker's ``_dump_error`` sent it), with its
    traceback as ``__cause__``; when its pickle cannot be loaded here, a ``RemoteCallError`` that
    keeps its type's name and message."""
    blob, tb, name, message = sent.pickled, sent.traceback, sent.type_name, sent.message
    error: BaseException | None = None
    why = "which could not be pickled there"
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except Exception as exc:  # noqa: BLE001 - e.g. an __init__ that takes other arguments
            why = f"which could not be rebuilt here: {exc!r}"
    if not isinstance(error, BaseException):
        error = RemoteCallError(f"{name.rsplit('.', 1)[-1]}: {message}", remote_type=name)
        add_note(error, f"sheepdog: this stands for the {name} the call raised on the node, {why}")
    error.__cause__ = RemoteTraceback(restore_source(tb))
    return error
