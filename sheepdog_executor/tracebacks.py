"""Give remote tracebacks their source lines back.

cloudpickle rebuilds functions shipped by value with ``co_filename == "<dynamic-code>"``, so the
node cannot show their source. The client still has it: each such frame (line number and function
name) is matched to a function of the user's modules here, and its file and line are restored.
"""

from __future__ import annotations

import inspect
import linecache
import re
import sys
import types

_FRAME = re.compile(r'^  File "<dynamic-code>", line (\d+), in (.+)$')


def _candidates(name: str) -> list[types.CodeType]:
    found = []
    for module in list(sys.modules.values()):
        if module is None or getattr(module, "__name__", "").startswith(("sheepdog_executor", "_")):
            continue
        for value in list(getattr(module, "__dict__", {}).values()):
            for fn in _functions_in(value):
                code = fn.__code__
                if code.co_name == name and getattr(fn, "__module__", None) == module.__name__:
                    found.append(code)
    return found


def _functions_in(value: object) -> list[types.FunctionType]:
    if isinstance(value, types.FunctionType):
        return [value]
    if inspect.isclass(value):
        return [v for v in vars(value).values() if isinstance(v, types.FunctionType)]
    return []


def restore_source(tb: str) -> str:
    """Replace ``<dynamic-code>`` frames by the client's file name and source line, when known."""
    if "<dynamic-code>" not in tb:
        return tb
    out: list[str] = []
    for line in tb.splitlines():
        match = _FRAME.match(line)
        if match:
            lineno, name = int(match.group(1)), match.group(2)
            for code in _candidates(name):
                lines = range(code.co_firstlineno, code.co_firstlineno + 10_000)
                source = linecache.getline(code.co_filename, lineno).strip()
                if lineno in lines and source:
                    line = f'  File "{code.co_filename}", line {lineno}, in {name}\n    {source}'
                    break
        out.append(line)
    return "\n".join(out) + "\n"
