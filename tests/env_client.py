"""A client for the environment="sync" tests, run with the test's own client venv (dask, numpy and
the editable local package ``sdenvpkg``, none of which the nodes have).

Usage: python env_client.py HOST SESSION_ROOT SCENARIO. Prints one JSON line.
SCENARIO: "run" (dask.compute and a map of the local package, then a second executor that reuses the
environment); "offline" (the same, with the head node's pip pointed at a closed port); "unprovidable"
(a distribution no index has is installed here: the executor must not start).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy
import sdenvpkg

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.distributions import client_distributions
from sheepdog_executor.errors import EnvironmentSyncFailed

#: A port nothing listens on: the head node's pip gets "connection refused" at once.
CLOSED_INDEX = "http://127.0.0.1:9/simple"
#: A distribution no package index has, installed here by the "unprovidable" scenario.
FAKE = "sheepdog-no-such-dist"


def where_things_are() -> dict[str, str]:
    """On the node: the versions and files of what the client has, as the node imports them."""
    import sys

    import dask
    import numpy
    import sdenvpkg

    return {
        "python": sys.executable,
        "dask": dask.__version__,
        "numpy": numpy.__version__,
        "sdenvpkg": sdenvpkg.__file__,
    }


def main(host: str, root: str, scenario: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "host": host,
        "environment": "sync",
        "session_root": root,
        "max_workers": 4,
        "poll_interval": 0.5,
        "progress": bool(os.environ.get("ENV_CLIENT_PROGRESS")),
    }
    if scenario == "offline":
        options["command_setup"] = [f"export PIP_INDEX_URL={CLOSED_INDEX} PIP_EXTRA_INDEX_URL="]
    if scenario == "unprovidable":
        site = tempfile.mkdtemp()
        info = Path(site, "sheepdog_no_such_dist-1.0.dist-info")
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE}\nVersion: 1.0\n")
        (info / "RECORD").write_text("sheepdog_no_such_dist.py,,\n")
        Path(site, "sheepdog_no_such_dist.py").write_text("")
        sys.path.append(site)
        # only the distribution at fault is synced: the error comes without building anything else
        options["environment_exclude"] = [d.name for d in client_distributions() if d.name != FAKE]
        started = time.monotonic()
        try:
            GridEngineExecutor(**options)
        except EnvironmentSyncFailed as exc:
            return {"error": str(exc), "type": type(exc).__name__, "seconds": time.monotonic() - started}
        return {"error": None}
    started = time.monotonic()
    with GridEngineExecutor(**options) as executor:
        first_start = time.monotonic() - started
        assert executor.environment is not None
        first = executor.environment
        (total,) = dask.compute(da.arange(1000, chunks=100).sum(), scheduler=executor)
        mapped = list(executor.map(sdenvpkg.triple, range(5)))
        node = executor.submit(where_things_are).result()
    started = time.monotonic()
    with GridEngineExecutor(**options) as executor:
        second_start = time.monotonic() - started
        assert executor.environment is not None
        second = executor.environment
        again = executor.submit(sdenvpkg.triple, 7).result()
    return {
        "first": {"path": first.path, "built": first.built, "mode": first.mode, "start": first_start},
        "second": {"path": second.path, "built": second.built, "start": second_start},
        "total": int(total),
        "mapped": mapped,
        "again": again,
        "node": node,
        "client": {"dask": dask.__version__, "numpy": numpy.__version__},
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
