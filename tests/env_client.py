"""A client for the environment="sync" tests, run with the test's own client venv (dask, numpy and
the editable local package ``sdenvpkg``, none of which the nodes have).

Usage: python env_client.py HOST SESSION_ROOT SCENARIO. Prints one JSON line.
SCENARIO: "run" (dask.compute and a map of the local package, then a second executor that reuses the
environment); "offline" (the same, with the head node's pip pointed at a closed port); "unprovidable"
(a distribution no index has is installed here: the executor must not start); "race" (two
executors start at once and need the same environment); "vcs" (only ``sdvcspkg``, which the test
installed from a git repository it then removed, is synced: a call on the nodes imports it).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy
import sdenvpkg
from support import read_line

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.distributions import EnvironmentSpec, NodePython, client_distributions
from sheepdog_executor.environment import HeadNode
from sheepdog_executor.errors import EnvironmentSyncFailed
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.shell import SSHShell, SSHTarget

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


def vcs_package() -> dict[str, str]:
    """Where this Python has ``sdvcspkg`` from, its version and its commit's value."""
    import importlib.metadata
    import socket

    import sdvcspkg

    return {
        "version": importlib.metadata.version("sdvcspkg"),
        "value": sdvcspkg.VALUE,
        "file": sdvcspkg.__file__,
        "host": socket.gethostname(),
    }


def toolz_version() -> str:
    import toolz

    return str(toolz.__version__)


def race(host: str, root: str, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Two executors start at once and need the same (small) environment. The environment's lock is
    held here until both have found it missing (each has made its upload directory), so the
    second surely meets the first's build in progress."""
    options["environment_exclude"] = [d.name for d in client_distributions() if d.name != "toolz"]
    envs = f"{root}/envs"
    shell = SSHShell(SSHTarget.resolve(host))
    node = NodePython.from_probe(HeadNode(shell, JobOptions()).tool("probe", envs))
    key = EnvironmentSpec.from_client(exclude=options["environment_exclude"]).key(node)
    hold = (
        "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()"
    )
    command = f"mkdir -p {envs} && python3 -c {shlex.quote(hold)} {envs}/{key}.lock"
    holder = subprocess.Popen(
        ["ssh", "-o", "BatchMode=yes", host, command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert read_line(holder, 60, "the lock holder's word").strip() == "held"
    seen: list[dict[str, Any]] = []

    def start() -> None:
        with GridEngineExecutor(**options) as executor:
            assert executor.environment is not None
            mine = {"built": executor.environment.built, "path": executor.environment.path}
            mine["toolz"] = executor.submit(toolz_version).result()
            seen.append(mine)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while shell.run(f"ls -d {envs}/.staging-* 2>/dev/null | wc -l").stdout.strip() != "2":
        assert time.monotonic() < deadline, "the two executors did not both reach the build"
        time.sleep(0.2)
    assert holder.stdin is not None
    holder.stdin.close()  # the lock goes: one builds, the other waits for it, then uses its build
    holder.wait(timeout=60)
    for thread in threads:
        thread.join(timeout=600)
        assert not thread.is_alive(), "an executor's start did not end within 600 s"
    shell.close()
    return seen


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
    if scenario == "race":
        return {"race": race(host, root, options)}
    if scenario == "vcs":
        options["environment_exclude"] = [d.name for d in client_distributions() if d.name != "sdvcspkg"]
        with GridEngineExecutor(**options) as executor:
            assert executor.environment is not None
            synced = executor.environment
            node = executor.submit(vcs_package).result()
        return {"path": synced.path, "built": synced.built, "node": node, "client": vcs_package()}
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
