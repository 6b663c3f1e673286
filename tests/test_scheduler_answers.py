"""A scheduler that answers badly for a while (nothing, garbage, truncated XML, a command that hangs)
ends no call and leaves nothing running on the head node: a PATH shim of the test's own puts wrapper
``qstat``/``squeue`` scripts before the real ones for the executor's scheduler commands only."""

from __future__ import annotations

import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
from support import Cluster, wait_until

from sheepdog_executor import ClusterExecutor
from sheepdog_executor.scheduler.base import Scheduler

pytestmark = pytest.mark.cluster

#: The wrapper: what it does is read, each time, from the ``mode`` file next to it.
SHIM = """#!/bin/sh
d={dir}
case "$(cat "$d/mode" 2>/dev/null)" in
empty-once) echo real > "$d/mode"; exit 0 ;;
garbage) echo "$(date) an answer garbled <job_info><job_list> |||"; exit 0 ;;
truncated) {real} "$@" | head -c 150; exit 0 ;;
hang) echo "$$" >> "$d/hung"; while :; do sleep 1; done ;;
esac
exec {real} "$@"
"""
COMMANDS = {"gridengine": "qstat", "slurm": "squeue"}


class Shim:
    """A directory of wrapper scripts on the head node (on the shared /home), and its mode."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.name = f"sheepdog-test-shim-{uuid.uuid4().hex[:12]}"
        self.dir = f"/home/sdtest/.{self.name}"
        command = COMMANDS[cluster.scheduler]
        real = cluster.ssh(f"command -v {command}").stdout.strip()
        assert real.startswith("/"), f"{command} not found on {cluster.alias}"
        script = SHIM.format(dir=shlex.quote(self.dir), real=shlex.quote(real))
        made = cluster.ssh(
            f"mkdir -m 700 {self.dir} && echo real > {self.dir}/mode && "
            f"printf %s {shlex.quote(script)} > {self.dir}/{command} && chmod 700 {self.dir}/{command}"
        )
        assert made.returncode == 0, made.stderr
        #: The executor's ``command_setup=``: the shim first on PATH, for its scheduler commands only.
        self.setup = f"PATH={self.dir}:$PATH; export PATH"

    def set(self, mode: str) -> None:
        assert self.cluster.ssh(f"echo {mode} > {self.dir}/mode").returncode == 0

    def mode(self) -> str:
        return self.cluster.ssh(f"cat {self.dir}/mode").stdout.strip()

    def hung(self) -> list[str]:
        """Pids of the wrappers that hung so far."""
        return self.cluster.ssh(f"cat {self.dir}/hung 2>/dev/null").stdout.split()

    def running(self) -> str:
        """The wrappers still running on the head node (the character class keeps the pattern from
        matching the command line of the ssh that asks)."""
        pattern = shlex.quote(f"{self.name[:-1]}[{self.name[-1]}]/")
        return self.cluster.ssh(f"pgrep -af {pattern}").stdout.strip()

    def remove(self) -> None:
        pattern = shlex.quote(f"{self.name[:-1]}[{self.name[-1]}]/")
        self.cluster.ssh(f"pkill -f {pattern}; rm -rf {self.dir}")


@pytest.fixture
def shim(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shim]:
    # a hung poll ends on the head node after 3 s (poll_timeout - shell.BOUND_MARGIN), not 55 s
    monkeypatch.setattr(Scheduler, "poll_timeout", 8.0)
    made = Shim(cluster)
    yield made
    made.remove()


def slow_double(x: int) -> int:
    time.sleep(0.5)
    return 2 * x


def test_a_scheduler_answering_nothing_then_garbage_then_hanging_fails_no_call(
    shim: Shim, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    executor = make_any_executor(
        command_setup=shim.setup, max_workers=4, job_name=shim.name[-20:], poll_interval=1.0
    )
    futures: list[Future[int]] = [executor.submit(slow_double, i) for i in range(400)]
    wait_until(lambda: sum(f.done() for f in futures) >= 8, 120, "the workers to run calls")
    shim.set("empty-once")  # one poll answered with nothing (exit 0)
    wait_until(lambda: shim.mode() == "real", 30, "the empty answer to be read")
    shim.set("truncated" if shim.cluster.scheduler == "gridengine" else "garbage")
    time.sleep(10)  # the bad answers last: what the test is about, not a wait for an event
    shim.set("garbage")
    time.sleep(10)
    shim.set("hang")
    wait_until(lambda: len(shim.hung()) >= 2, 60, "two polls to hang")
    shim.set("real")
    assert not all(f.done() for f in futures), "the map ended before the scheduler's bad answers did"
    failed = [f.exception(timeout=300) for f in futures if f.exception(timeout=300) is not None]
    assert failed == [], f"{len(failed)} of {len(futures)} calls failed, the first: {failed[:1]}"
    assert [f.result() for f in futures] == [2 * i for i in range(400)]
    polls = executor.status()["polls"]
    assert polls["failed"] >= 5 and polls["answered"] >= 1, polls
    wait_until(lambda: not shim.running(), 10, "the hung scheduler commands to end on the head node")
