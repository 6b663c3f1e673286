"""The backends behind joblib's cluster names inside a worker (imported only once joblib is loaded).

``"gridengine"`` and ``"slurm"`` become loky on this node, with a warning once; ``"loky"`` itself is
the same loky whose nested backends are classes of this module, so that a loky child of the worker,
which unpickles them, imports this module and knows the names too.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from joblib.parallel import LokyBackend, SequentialBackend, ThreadingBackend, register_parallel_backend

from sheepdog_executor.remote.nested import CLUSTER_BACKENDS, JOB_ID_ENV

_warned: set[str] = set()


class NodeThreadingBackend(ThreadingBackend):
    """joblib's threads for the first nesting level, in a worker's loky child."""


class NodeSequentialBackend(SequentialBackend):
    """joblib's sequential backend for deeper nesting, in a worker's loky child."""


class NodeLokyBackend(LokyBackend):
    """joblib's loky, on the node; its nested backends carry this module into loky's children."""

    def get_nested_backend(self) -> Any:
        backend, n_jobs = super().get_nested_backend()
        own = NodeSequentialBackend if isinstance(backend, SequentialBackend) else NodeThreadingBackend
        return own(nesting_level=backend.nesting_level), n_jobs


def _cluster_backend(name: str) -> Any:
    def factory(nesting_level: int | None = None, inner_max_num_threads: int | None = None, **_: Any) -> Any:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"joblib backend {name!r} inside a sheepdog worker (job {os.environ.get(JOB_ID_ENV)}): "
                "its calls run here, on this task's node, with joblib's 'loky' backend; a nested "
                "Parallel does not submit jobs of its own",
                RuntimeWarning,
                stacklevel=2,
            )
        return NodeLokyBackend(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)

    return factory


def register() -> None:
    """Register the node's meanings of joblib's names (idempotent)."""
    register_parallel_backend("loky", NodeLokyBackend)
    for name in CLUSTER_BACKENDS:
        register_parallel_backend(name, _cluster_backend(name))


register()
