"""Glue to tools users already run: joblib (``joblib_backend``), progress bars (``progress``).

dask needs no glue: it takes any ``concurrent.futures.Executor`` as its scheduler,
``dask.compute(x, scheduler=executor)``; its nodes need dask (and numpy for arrays).

Importing this package makes joblib's ``"gridengine"`` backend available without importing joblib
(which costs about half a second, numpy included): at once when joblib is already imported, else
right after ``joblib.parallel`` first loads. ``joblib_backend`` itself loads on the backend's first use.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger("sheepdog_executor")

#: The name to give joblib: ``joblib.parallel_config(backend="gridengine", host=...)``.
JOBLIB_BACKEND = "gridengine"
#: The same for ``SlurmExecutor``: ``joblib.parallel_config(backend="slurm", host=...)``.
SLURM_JOBLIB_BACKEND = "slurm"


def _gridengine_backend(**options: Any) -> Any:
    """joblib's factory for the backend: loads ``joblib_backend`` only when the backend is used."""
    from sheepdog_executor.integrations.joblib_backend import GridEngineBackend

    return GridEngineBackend(**options)


def _slurm_backend(**options: Any) -> Any:
    from sheepdog_executor.integrations.joblib_backend import SlurmBackend

    return SlurmBackend(**options)


def _register_with_joblib() -> None:
    try:
        from joblib.parallel import register_parallel_backend

        register_parallel_backend(JOBLIB_BACKEND, _gridengine_backend)
        register_parallel_backend(SLURM_JOBLIB_BACKEND, _slurm_backend)
    except Exception as exc:  # noqa: BLE001 - never break the user's import of joblib
        log.warning("could not register the joblib backend %r: %s", JOBLIB_BACKEND, exc)


class _AfterImport(importlib.abc.MetaPathFinder):
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


def _register_joblib_backend_lazily() -> None:
    if "joblib.parallel" in sys.modules:
        _register_with_joblib()
    elif importlib.util.find_spec("joblib") is not None:
        if not any(isinstance(f, _AfterImport) and f.name == "joblib.parallel" for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport("joblib.parallel", _register_with_joblib))


_register_joblib_backend_lazily()
