"""Fixtures for the real test cell (scripts/test-cell.sh): its ssh alias, executors, qstat."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor

CELL_ALIAS = os.environ.get("SHEEPDOG_TEST_HOST", "fear")
#: The interpreter on the nodes: the cell's python3 unless the client runs another minor version
#: (scripts/run-tests.sh sets it to /opt/sheepdog-pythons/X.Y/bin/pythonX.Y for 3.10 and 3.13).
NODE_PYTHON = os.environ.get("SHEEPDOG_TEST_NODE_PYTHON", "python3")
#: Headless Chromium, for the tests that look at a page (scripts/run-tests.sh installs it).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
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


@pytest.fixture(scope="session")
def cell() -> str:
    """The ssh alias of the test cell; skip (or fail in CI) when it is not up."""
    return require_up(
        CELL_ALIAS, "qstat -f", lambda out: "all.q@" in out, "test cell", "scripts/test-cell.sh"
    )


@pytest.fixture
def make_executor(cell: str) -> Iterator[Callable[..., GridEngineExecutor]]:
    """Factory for executors on the cell; each is shut down (and its jobs checked gone) after."""
    made = yield from executor_factory(GridEngineExecutor, cell, python=NODE_PYTHON)
    for executor in made:
        left = our_jobs(set(executor.job_ids))
        assert not left, f"jobs left on the cell after shutdown: {left}"


NODE_PACKAGES = [f"{name}=={importlib.metadata.version(name)}" for name in ("dask", "numpy")]


@pytest.fixture(scope="session")
def node_packages(cell: str) -> str:
    """A set-up line giving the workers dask and numpy, installed on the cell once (pip --target)."""
    python = "py{}.{}".format(*sys.version_info[:2])
    target = f"$HOME/.cache/sheepdog-tests/{python}-" + "-".join(p.replace("==", "") for p in NODE_PACKAGES)
    pinned = " ".join(shlex.quote(p) for p in NODE_PACKAGES)
    # into a fresh directory renamed into place, so concurrent test runs never see half an install
    script = textwrap.dedent(
        f"""
        set -e
        d="{target}"
        if [ ! -d "$d" ]; then
            mkdir -p "$(dirname "$d")"
            t=$(mktemp -d "$d.XXXXXX")
            python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \\
                --target "$t" {pinned} || {{ rm -rf "$t"; exit 1; }}
            mv -T "$t" "$d" 2>/dev/null || rm -rf "$t"
        fi
        PYTHONPATH="$d" python3 -c 'import dask.array, numpy'
        echo "$d"
        """
    )
    done = ssh(script, timeout=280)
    if done.returncode != 0:
        pytest.fail(f"could not install {NODE_PACKAGES} for the cell's python3:\n{done.stderr[-2000:]}")
    return f"export PYTHONPATH={shlex.quote(done.stdout.strip().splitlines()[-1])}"


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


@pytest.fixture(scope="session")
def slurm_cell() -> str:
    """The ssh alias of the Slurm test cluster; skip (or fail in CI) when it is not up."""
    return require_up(
        SLURM_ALIAS,
        "sinfo -h -o %t",
        lambda out: bool(out.strip()),
        "Slurm test cluster",
        "scripts/test-cell.sh --slurm",
    )


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


@pytest.fixture(params=["gridengine", "slurm"])
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """Each real scheduler in turn (tests that use it run on both)."""
    return cluster_of(request.param, request.getfixturevalue(CELL_FIXTURES[request.param]))


@pytest.fixture
def make_any_executor(cluster: Cluster) -> Iterator[Callable[..., ClusterExecutor]]:
    """``make_executor`` on each real scheduler in turn."""
    made = yield from executor_factory(cluster.executor, cluster.alias, python=NODE_PYTHON)
    for executor in made:
        left = cluster.jobs(set(executor.job_ids))
        assert not left, f"jobs left on {cluster.scheduler} after shutdown: {left}"


@pytest.fixture
def chromium() -> Callable[..., str]:
    """Run headless Chromium on a URL with a fresh profile: returns what it printed (``--dump-dom``)."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (scripts/run-tests.sh installs it)")
        pytest.skip("chromium is not installed: apt-get install chromium")

    def run(url: str, *args: str, budget_ms: int = 2500) -> str:
        with tempfile.TemporaryDirectory() as profile:
            done = subprocess.run(
                [
                    str(CHROMIUM),
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    "--window-size=1200,900",
                    f"--virtual-time-budget={budget_ms}",
                    *args,
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    return run
