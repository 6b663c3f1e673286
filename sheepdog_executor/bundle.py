"""The worker bundle: a zip the nodes run as ``python bundle.zip``; all they need but Python."""

from __future__ import annotations

import functools
import io
import zipfile
from pathlib import Path

import cloudpickle

_REMOTE = Path(__file__).with_name("remote")
_STUB = (
    '"""Stub package on the nodes: only sheepdog_executor.remote is shipped."""\n'
    "from sheepdog_executor.remote import nested as _nested\n\n"
    "_nested.install()  # joblib's cluster backends run nested calls on the node\n"
    "_nested.lend_to_children()  # and loky's children import cloudpickle and this package\n"
)


@functools.cache
def worker_bundle() -> bytes:
    """Zip of the worker, its protocol and cloudpickle, with a ``__main__.py`` entry point."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("__main__.py", (_REMOTE / "bundle_main.py").read_text())
        archive.writestr("sheepdog_executor/__init__.py", _STUB)
        for name in (
            "__init__.py",
            "budget.py",
            "compat.py",
            "joblib_local.py",
            "nested.py",
            "protocol.py",
            "reach.py",
            "store.py",
            "worker.py",
        ):
            archive.writestr(f"sheepdog_executor/remote/{name}", (_REMOTE / name).read_text())
        package = Path(cloudpickle.__file__).parent
        for source in sorted(package.glob("*.py")):
            archive.writestr(f"cloudpickle/{source.name}", source.read_text())
    return buffer.getvalue()
