"""The helpers the tests import (the fixtures and hooks are in ``conftest.py``, which uses these).

The test cells: their ssh aliases, OpenSSH commands on their head nodes (independent of the code
under test), their jobs as the scheduler lists them, and the ``Cluster`` of each scheduler.

Waits with a deadline (``wait_until``), and client processes in which Ctrl-C works: a suite started
as a background job of a non-interactive shell inherits SIGINT ignored, and so would every client it
starts: a test that sends SIGINT would then wait on a client that never stops. And a ``readline()``
on a client that hangs blocks for ever; ``read_line`` gives up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor

CELL_ALIAS = os.environ.get("SHEEPDOG_TEST_HOST", "fear")
#: The interpreter on the nodes: the cell's python3 unless the client runs another minor version
#: (scripts/run-tests.sh sets it to /opt/sheepdog-pythons/X.Y/bin/pythonX.Y for 3.10 and 3.13).
NODE_PYTHON = os.environ.get("SHEEPDOG_TEST_NODE_PYTHON", "python3")
#: The ssh alias of the Slurm test cluster (scripts/test-cell.sh --slurm).
SLURM_ALIAS = os.environ.get("SHEEPDOG_TEST_SLURM_HOST", "fear-slurm")


def ssh_to(alias: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command on a test cluster's head node with OpenSSH (independent of the code under test)."""
    return subprocess.run(
        ["ssh", "-o", "BatchMode=yes", alias, command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ssh(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command on the cell with OpenSSH."""
    return ssh_to(CELL_ALIAS, command, timeout)


def our_jobs(job_ids: list[str] | set[str]) -> dict[str, list[str]]:
    """job id -> states (one per task row) of these jobs as qstat shows them now."""
    out = ssh("qstat -xml").stdout
    found: dict[str, list[str]] = {}
    for entry in ET.fromstring(out).iter("job_list"):
        job = entry.findtext("JB_job_number") or ""
        if job in job_ids:
            found.setdefault(job, []).append(entry.findtext("state") or "")
    return found


def wait_until(predicate: Callable[[], Any], within: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def require_up(alias: str, probe: str, up_if: Callable[[str], bool], what: str, start: str) -> str:
    """``alias`` when ``probe`` succeeds there with an output that ``up_if`` accepts; otherwise skip
    (or fail in CI), saying that the command ``start`` brings ``what`` up. In the unit tier
    (``SHEEPDOG_TEST_NO_CELL=1``, scripts/run-unit-tests.sh) a test that asks for a cell fails."""
    import pytest  # here, not at the top: child clients import this module without pytest

    if os.environ.get("SHEEPDOG_TEST_NO_CELL") == "1":
        pytest.fail(
            f"this test needs the {what} '{alias}' but is not marked cluster or multihost: the unit "
            "tier (SHEEPDOG_TEST_NO_CELL=1, scripts/run-unit-tests.sh) runs without any cell"
        )
    try:
        done = ssh_to(alias, probe, timeout=30)
        up = done.returncode == 0 and up_if(done.stdout)
    except (OSError, subprocess.TimeoutExpired):
        up = False
    if not up:
        message = f"{what} '{alias}' unreachable: run {start} as root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return alias


def own_sshd_config(port: int, *extra: str) -> tuple[Path, Path]:
    """The cell's sshd configuration for an sshd of a test's own on 127.0.0.1:``port`` (with
    ``extra`` lines), its host key known for that port: (config path, pid file path)."""
    config = Path("/var/lib/sheepdog-test-cell/sshd_config").read_text()
    path = Path(f"/tmp/sheepdog-test-sshd-{port}.conf")
    pidfile = Path(f"/tmp/sheepdog-test-sshd-{port}.pid")
    overridden = ("Port", "PidFile", *(line.split()[0] for line in extra))
    lines = [line for line in config.splitlines() if not line.startswith(overridden)]
    path.write_text("\n".join([*lines, f"Port {port}", f"PidFile {pidfile}", *extra]) + "\n")
    known = Path("/root/.ssh/known_hosts")
    if f"[127.0.0.1]:{port}" not in known.read_text():
        keys = subprocess.run(
            ["ssh-keyscan", "-p", "2222", "-t", "ed25519", "127.0.0.1"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        with known.open("a") as handle:
            handle.write(keys.replace("[127.0.0.1]:2222", f"[127.0.0.1]:{port}"))
    return path, pidfile


def require_netns() -> None:
    """Skip unless this process can make network namespaces and veth links (root, iproute2)."""
    import pytest

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")


E = TypeVar("E", bound=ClusterExecutor)


def executor_factory(
    executor_class: type[E], host: str, **defaults: Any
) -> Generator[Callable[..., E], None, list[E]]:
    """The body of a fixture that yields a factory of executors on ``host`` (with ``defaults`` for
    options not given), shuts down every executor made after the test, and returns them (to check
    that their jobs are gone): ``made = yield from executor_factory(...)``."""
    made: list[E] = []

    def make(**options: Any) -> E:
        executor = executor_class(
            host=host, **{"max_workers": 8, "poll_interval": 0.5, **defaults, **options}
        )
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)
    return made


def slurm_ssh(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command on the Slurm cluster's head node with OpenSSH."""
    return ssh_to(SLURM_ALIAS, command, timeout)


def slurm_jobs(job_ids: list[str] | set[str]) -> dict[str, list[str]]:
    """job id -> states (one per task) of these jobs as squeue shows them now."""
    out = slurm_ssh('squeue -h -r -u "$(id -un)" -o "%F %T"').stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        job, _, state = line.partition(" ")
        if job in job_ids:
            found.setdefault(job, []).append(state)
    return found


@dataclass(frozen=True)
class Cluster:
    """A real test cluster of one scheduler: its ssh alias, its executor, how to list its jobs."""

    scheduler: str
    alias: str
    executor: type[ClusterExecutor]
    jobs: Callable[[set[str]], dict[str, list[str]]]
    #: Options that make a job the scheduler holds where it can never start, and what it then says.
    never_starts: dict[str, Any]
    never_starts_reason: str
    #: The accounting field, and how its value starts, for a task whose worker got SIGKILL.
    killed: tuple[str, str]
    #: The command another user of the account would type to remove one task ({job}, {task}), and
    #: the accounting field and how its value starts then.
    delete_task: str
    deleted: tuple[str, str]

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command on this cluster's head node with OpenSSH."""
        return ssh_to(self.alias, command, timeout)


def cluster_of(scheduler: str, alias: str) -> Cluster:
    """The test cluster of ``scheduler`` ("gridengine" or "slurm") reached as ``alias``."""
    if scheduler == "gridengine":
        return Cluster(
            "gridengine",
            alias,
            GridEngineExecutor,
            our_jobs,
            {"working_directory": "/nonexistent/dir"},
            "/nonexistent/dir",
            ("exit_status", "137"),
            "qdel {job} -t {task}",
            ("failed", "100"),
        )
    return Cluster(
        "slurm",
        alias,
        SlurmExecutor,
        slurm_jobs,
        {"partition": "short", "time": "5"},  # more than its MaxTime: PartitionTimeLimit (or Config)
        "Partition",
        ("ExitCode", "0:9"),
        "scancel {job}_{task}",
        ("State", "CANCELLED"),
    )


#: The fixture that brings up (or skips) each real cluster, by scheduler.
CELL_FIXTURES = {"gridengine": "cell", "slurm": "slurm_cell"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python then turns it into KeyboardInterrupt


def spawn(args: list[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(args, ...)`` whose child takes SIGINT as Python's default (a
    ``KeyboardInterrupt``) even when this process ignores it."""
    return subprocess.Popen(args, preexec_fn=_default_sigint, **popen_kwargs)


def read_line(child: subprocess.Popen[Any], within: float, what: str) -> str:
    """The child's next line of stdout. A child that writes none within ``within`` seconds is
    killed, and the test fails naming ``what`` and the end of what the child wrote to stderr."""
    assert child.stdout is not None
    line: list[Any] = []
    reader = threading.Thread(target=lambda: line.append(child.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(within)
    if reader.is_alive() or not line or not line[0]:
        reason = f"no line within {within:.0f} s" if reader.is_alive() else "it ended without one"
        child.kill()
        reader.join(10)
        try:
            _, stderr = child.communicate(timeout=10)
        except (subprocess.TimeoutExpired, ValueError):
            stderr = ""
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
        raise AssertionError(f"{what}: {reason}; the client's stderr ends:\n{stderr[-3000:]}")
    return line[0].decode() if isinstance(line[0], bytes) else str(line[0])
