"""Workers as subprocesses of this machine: no cluster, no SSH; the same worker, the same endpoint."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
from collections.abc import Collection
from typing import Any

from sheepdog_executor.jobscript import WorkerLaunch, task_body
from sheepdog_executor.scheduler.base import JobStates, NoOptions, Scheduler, TaskState


class LocalScheduler(Scheduler[NoOptions]):
    """Each "job" is a group of local processes; task ids count from 1 as in an array job."""

    name = "local processes"
    _job_numbers = itertools.count(1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs: dict[str, dict[int, subprocess.Popen[bytes]]] = {}
        self._lock = threading.Lock()

    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        job_id = f"local{os.getpid()}-{next(self._job_numbers)}"
        command = task_body(self.options, launch)
        processes = {}
        for task in range(1, tasks + 1):
            env = dict(os.environ, SHEEPDOG_JOB_ID=job_id, SHEEPDOG_TASK_ID=str(task))
            env["SHEEPDOG_RESOURCE_SET"] = self.options.needs.label()  # whose calls it takes
            with (
                open(os.path.expanduser(launch.output_path(job_id, task, "out")), "wb") as out,
                open(os.path.expanduser(launch.output_path(job_id, task, "err")), "wb") as err,
            ):
                processes[task] = subprocess.Popen(
                    ["/bin/sh", "-c", command],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    cwd=self.options.working_directory,
                    start_new_session=True,
                )
        with self._lock:
            self._jobs[job_id] = processes
        return job_id

    def poll(self, job_ids: Collection[str]) -> JobStates:
        states: JobStates = {}
        with self._lock:
            for job in job_ids:
                for task, proc in self._jobs.get(job, {}).items():
                    if proc.poll() is None:
                        states.setdefault(job, {})[task] = TaskState.RUNNING
        return states

    def cancel(self, job_ids: Collection[str]) -> None:
        with self._lock:
            for job in job_ids:
                for proc in self._jobs.get(job, {}).values():
                    _kill(proc)

    def cancel_task(self, job_id: str, task_id: int) -> None:
        with self._lock:
            proc = self._jobs.get(job_id, {}).get(task_id)
        if proc is not None:
            _kill(proc)

    def accounting(self, job_id: str, task_id: int) -> dict[str, str]:
        proc = self._jobs.get(job_id, {}).get(task_id)
        if proc is None or proc.returncode is None:
            return {}
        code = proc.returncode
        return {
            "exit_status": str(128 - code if code < 0 else code),
            "failed": "0" if code >= 0 else f"killed by signal {-code}",
        }


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
