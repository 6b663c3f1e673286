"""joblib's cluster backends inside a worker: a call that runs ``Parallel(backend="gridengine")`` (or
``"slurm"``) on a node runs those calls there, with joblib's own ``loky``, and is told so once; as
dask's backend name resolves inside dask's workers. Stdlib only: joblib is touched only once the
user's code has imported it.

The worker's stub package calls ``install()``; so does the client package when it finds itself in a
task (``SHEEPDOG_JOB_ID`` is set). ``AfterImport`` is also how the client registers its real backends.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

#: The names the client registers with joblib (``integrations.JOBLIB_BACKEND`` and the Slurm one).
CLUSTER_BACKENDS = ("gridengine", "slurm")
#: Set in every task by its job script: the process is a worker (or a child of one).
JOB_ID_ENV = "SHEEPDOG_JOB_ID"


def in_worker() -> bool:
    """Whether this process is a worker's, or a child of one (the task's variables are inherited)."""
    return bool(os.environ.get(JOB_ID_ENV))


def install() -> None:
    """Give joblib the node-local backends now if it is loaded, else right after it loads."""
    when_imported("joblib.parallel", _register)


def lend_to_children() -> None:
    """Let the worker's child interpreters (loky's, multiprocessing's) import what the bundle brings
    (cloudpickle, this package): its zip goes at the end of ``PYTHONPATH``, after anything installed.
    Without it a loky child on a node without cloudpickle dies at start (exit 1)."""
    bundle = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not bundle.endswith(".zip"):
        return
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if bundle not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, bundle])


def when_imported(name: str, then: Callable[[], None]) -> None:
    """Run ``then`` once module ``name`` is loaded: now if it is, else right after its first import."""
    if name in sys.modules:
        then()
    elif importlib.util.find_spec(name.partition(".")[0]) is not None:
        if not any(isinstance(f, AfterImport) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, AfterImport(name, then))


def _register() -> None:
    from sheepdog_executor.remote import joblib_local

    joblib_local.register()


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then`` once, right after the module ``name`` is first executed; then steps aside."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name, self.then = name, then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            return None  # another thread's import got here first
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader(importlib.abc.Loader):
    """Delegates to the real loader and calls ``then`` after the module ran; the module keeps the
    real loader as ``__loader__``, so source lookups and resources work as without us."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.then()
