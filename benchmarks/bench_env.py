"""How long ``environment="sync"`` takes: the first start (the environment is built) and later starts
(it is found and reused), against an executor's start without it, on a real cell over SSH.

The client is a venv of this machine's Python with ``--packages`` (default dask and numpy, at the
versions installed here when they are) and sheepdog-executor's own dependencies, made once and cached
in ``~/.cache/sheepdog-bench``. The environments go under a fresh session root on the cluster,
removed at the end, so the first start always builds.

Run: ``python benchmarks/bench_env.py [--host fear] [--packages dask numpy] [--offline] [--repeat 3]``
(``--offline`` points the head node's pip at a closed port: wheels are downloaded here and uploaded).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import secrets
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OWN = ["cloudpickle", "tornado", "paramiko", "cryptography"]
CLOSED_INDEX = "http://127.0.0.1:9/simple"


def pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def client_venv(packages: list[str]) -> Path:
    """A cached venv with the packages (pinned to this interpreter's versions when installed)."""
    pins = [pinned(p) for p in [*packages, *OWN]]
    stamp = hashlib.sha256(json.dumps([sys.version, pins]).encode()).hexdigest()[:12]
    venv = Path("~/.cache/sheepdog-bench").expanduser() / f"env-venv-{stamp}"
    if not (venv / "ready").exists():
        print(f"making the client venv {venv}: {' '.join(pins)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, *pins], check=True)
        (venv / "ready").write_text("")
    return venv


def timed(make: Any) -> tuple[float, Any]:
    started = time.monotonic()
    value = make()
    return time.monotonic() - started, value


def child(host: str, offline: bool, repeat: int) -> None:
    """Inside the client venv: the measurements."""
    from sheepdog_executor import GridEngineExecutor
    from sheepdog_executor.environment import EnvironmentSync, HeadNode
    from sheepdog_executor.jobscript import JobOptions
    from sheepdog_executor.shell import SSHShell, SSHTarget

    shell = SSHShell(SSHTarget.resolve(host))
    home = shell.run('printf %s "$HOME"').stdout.strip()
    root = f"{home}/.sheepdog-bench-env-{secrets.token_hex(4)}"
    setup = [f"export PIP_INDEX_URL={CLOSED_INDEX} PIP_EXTRA_INDEX_URL="] if offline else []
    options: dict[str, Any] = {"host": host, "session_root": root, "command_setup": setup, "progress": True}

    def start(**extra: Any) -> Any:
        executor = GridEngineExecutor(**options, **extra)
        environment = executor.environment
        executor.shutdown()
        return environment

    try:
        plain = [timed(start)[0] for _ in range(repeat)]
        first, built = timed(lambda: start(environment="sync"))
        assert built is not None and built.built, "the first start did not build"
        cached = []
        for _ in range(repeat):
            seconds, reused = timed(lambda: start(environment="sync"))
            assert reused is not None and not reused.built, "a later start built again"
            cached.append(seconds)
        sync = EnvironmentSync.from_options("sync")
        assert sync is not None
        head = HeadNode(shell, JobOptions(), setup)
        checks = [timed(lambda: sync.prepare(head, root))[0] for _ in range(5)]
        rows = [
            ("executor start, no environment (median)", statistics.median(plain)),
            (f'first start with environment="sync" (built, {built.mode})', first),
            ('later start with environment="sync" (reused, median)', statistics.median(cached)),
            ("the reuse check alone (median of 5)", statistics.median(checks)),
        ]
        print(f"\n{len(sync.spec.distributions)} distributions synced to {host}, environment {built.path}")
        for what, seconds in rows:
            print(f"  {what:<55} {seconds:8.2f} s")
    finally:
        shell.run(f"rm -rf {shlex.quote(root)}", timeout=300)
        shell.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="fear")
    parser.add_argument("--packages", nargs="*", default=["dask", "numpy"])
    parser.add_argument("--offline", action="store_true", help="the head node's pip reaches no index")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.host, args.offline, args.repeat)
        return
    venv = client_venv(args.packages)
    argv = [str(venv / "bin" / "python"), __file__, "--child", "--host", args.host]
    argv += ["--repeat", str(args.repeat)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    sys.exit(subprocess.run(argv + ["--offline"] * args.offline, env=environment, check=False).returncode)


if __name__ == "__main__":
    main()
