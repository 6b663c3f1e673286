"""``doctor``'s python check: the interpreter on the head node, and in one test job shaped like the
executor's (same options, set-up lines and session root), submitted, waited for and removed."""

from __future__ import annotations

import dataclasses
import io
import re
import shlex
import time
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from sheepdog_executor.cli.common import CheckFailed, executor_default, make_scheduler
from sheepdog_executor.errors import ConfigurationError, SchedulerError
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch, with_setup
from sheepdog_executor.scheduler import Scheduler, TaskState
from sheepdog_executor.sessiondir import make_session_dir, prepare_root
from sheepdog_executor.shell import Shell

if TYPE_CHECKING:
    from sheepdog_executor.executor import ClusterExecutor

_PROBE_MAIN = (
    "import socket, sys\n"
    'sys.stdout.write("sheepdog-probe %d.%d.%d %s\\n" % (sys.version_info[0], sys.version_info[1], '
    "sys.version_info[2], socket.gethostname()))\n"
)
_PROBE_LINE = re.compile(r"^sheepdog-probe (\d+)\.(\d+)\.(\d+) (\S+)$", re.M)
_VERSION_SNIPPET = 'import sys; print("%d.%d.%d" % tuple(sys.version_info[:3]))'


class ProbeResult(NamedTuple):
    """What the test job printed: its Python version (None: it did not run) and node, its id and
    the end of its stderr."""

    version: str | None
    node: str
    job_id: str
    stderr: str


@dataclasses.dataclass
class PythonProbe:
    """Runs ``python`` where the executor would: on the head node after the set-up lines, and in one
    test job of ``executor_class``'s scheduler; ``timeout`` bounds the wait for that job."""

    shell: Shell
    options: Mapping[str, Any]
    job_options: JobOptions
    executor_class: type[ClusterExecutor]
    timeout: float

    def head_python(self) -> tuple[str | None, str]:
        """(version, why not) of the interpreter on the head node, after the set-up lines."""
        command = f"{shlex.quote(self.job_options.python)} -c {shlex.quote(_VERSION_SNIPPET)}"
        done = self.shell.run(with_setup(self.job_options, command), timeout=60)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines and re.fullmatch(r"\d+\.\d+\.\d+", lines[-1]):
            return lines[-1], ""
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return None, why

    def run_job(self) -> ProbeResult:
        """Run the interpreter in one job shaped like the executor's (same options and set-up), from a
        session directory of its own, removed afterwards with the job."""
        shell = self.shell
        session_root = str(self.options.get("session_root", executor_default("session_root")))
        try:  # as the executor makes its session directory: the probe runs from it too
            probe_dir = make_session_dir(shell, prepare_root(shell, session_root), prefix="doctor-")
        except ConfigurationError as exc:
            raise CheckFailed(str(exc), "set session_root= to a directory only you can write") from exc
        launch = WorkerLaunch(probe_dir, "doctor-probe")
        scheduler = make_scheduler(
            shell,
            self.options,
            dataclasses.replace(self.job_options, job_name="sheepdog-doctor"),
            self.executor_class.scheduler_class,
        )
        job_id = ""
        try:
            shell.put(launch.bundle_path, _probe_bundle(), 0o600)
            job_id = self._submit(scheduler, launch)
            self._wait_until_gone(scheduler, job_id)
            return self._read(scheduler, launch, job_id)
        finally:
            if job_id and scheduler.poll([job_id]):
                scheduler.cancel([job_id])
            shell.run(f"rm -rf {shlex.quote(probe_dir)}", timeout=30)

    @staticmethod
    def _submit(scheduler: Scheduler, launch: WorkerLaunch) -> str:
        try:
            return scheduler.submit(launch, 1)
        except SchedulerError as exc:
            raise CheckFailed(
                f"the test job was refused: {exc}",
                "check " + ", ".join(scheduler.option_names()) + " in your options",
            ) from exc

    def _read(self, scheduler: Scheduler, launch: WorkerLaunch, job_id: str) -> ProbeResult:
        """What the ended job printed (its output file) and the end of its stderr."""
        out = shlex.quote(launch.output_path(job_id, 1, "out"))
        # on a shared filesystem the output file can appear a moment after the job ended
        wait = f"for i in 1 2 3 4 5 6 7 8 9 10; do [ -e {out} ] && break; sleep 0.5; done; cat {out}"
        match = _PROBE_LINE.search(self.shell.run(f"{wait} 2>/dev/null", timeout=30).stdout)
        stderr = scheduler.output_tail(launch, job_id, 1)
        if match is None:
            return ProbeResult(None, "?", job_id, stderr)
        return ProbeResult(".".join(match.group(1, 2, 3)), match.group(4), job_id, stderr)

    def _wait_until_gone(self, scheduler: Scheduler, job_id: str) -> None:
        deadline = time.monotonic() + self.timeout
        inspect = scheduler.inspect_command(job_id)
        while True:
            tasks = scheduler.poll([job_id]).get(job_id)
            if not tasks:
                return
            queued = all(state is TaskState.QUEUED for state in tasks.values())
            if TaskState.ERROR in tasks.values():
                raise CheckFailed(
                    f"the test job {job_id} is in error state: {scheduler.error_reason(job_id)}",
                    "check that working_directory exists on the nodes and that the session "
                    "directory (session_root, on a filesystem the nodes share) is writable there, "
                    "and "
                    + ", ".join(scheduler.option_names())
                    + (f"; `{inspect}` shows the reason" if inspect else ""),
                )
            if time.monotonic() > deadline:
                why = scheduler.pending_reason(job_id) if queued else ""
                state = "waiting in the queue" if queued else "running"
                raise CheckFailed(
                    f"the test job {job_id} was still {state} after {self.timeout:.0f} s"
                    + (f"; the scheduler says: {why}" if why else ""),
                    "if the cluster is busy run doctor again with a longer --timeout; otherwise check "
                    "that "
                    + ", ".join(scheduler.option_names())
                    + " fit the cluster"
                    + (f" (`{inspect}`)" if inspect else ""),
                )
            time.sleep(1.0)


def _probe_bundle() -> bytes:
    """A zip that, run as the worker bundle, prints its Python version and node and exits."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__main__.py", _PROBE_MAIN)
    return buffer.getvalue()
