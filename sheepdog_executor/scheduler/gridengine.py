"""Grid Engine (SGE, Son of Grid Engine, UGE/AGE): qsub, qstat -xml, qdel, qacct."""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Collection
from dataclasses import dataclass

from sheepdog_executor.errors import SchedulerError
from sheepdog_executor.jobscript import WorkerLaunch, render_gridengine
from sheepdog_executor.scheduler.base import JobStates, Scheduler, TaskState

_TERSE_JOB_ID = re.compile(r"^(\d+)(?:\.\d+-\d+:\d+)?$")


class GridEngineScheduler(Scheduler):
    name = "Grid Engine"
    commands = ("qsub", "qstat", "qdel")

    def prepare(self) -> None:
        probe = "; ".join(f"command -v {c} >/dev/null || echo {c}" for c in self.commands)
        missing = self.run(probe, timeout=60).stdout.split()
        if missing:
            raise SchedulerError(
                f"{', '.join(missing)} not found on {self.shell.description} in a non-interactive "
                "shell; add Grid Engine's bin directory to PATH in the remote ~/.bashrc (before any "
                "'return if not interactive' line), or pass command_setup=['. /path/to/settings.sh']"
            )

    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        script = render_gridengine(self.options, launch, tasks)
        done = self.run("qsub -terse", stdin=script.encode(), retry=False)  # never submit twice
        match = _TERSE_JOB_ID.match(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "")
        if done.returncode != 0 or not match:
            raise SchedulerError(
                f"qsub on {self.shell.description} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return match.group(1)

    def poll(self, job_ids: Collection[str]) -> JobStates:
        if not job_ids:
            return {}
        done = self.run('qstat -xml -u "$(id -un)"', timeout=60)
        if done.returncode != 0:
            raise SchedulerError(f"qstat failed on {self.shell.description}: {done.stderr.strip()}")
        return parse_qstat_xml(done.stdout, set(job_ids))

    def cancel(self, job_ids: Collection[str]) -> None:
        if job_ids:
            self.run("qdel " + " ".join(shlex.quote(j) for j in job_ids) + " >/dev/null 2>&1", timeout=60)

    def own_jobs(self) -> list[JobInfo]:
        """The user's own jobs with their names and output paths: ``qstat -u`` for the ids, then
        ``qstat -j`` of those ids only (never ``qstat -j "*"``: every user's jobs, slow on a big
        cluster)."""
        listing = self.run('id -un && qstat -xml -u "$(id -un)"', timeout=60)
        me, _, xml = listing.stdout.partition("\n")
        if listing.returncode != 0 or not me.strip():
            raise SchedulerError(f"qstat failed on {self.shell.description}: {listing.stderr.strip()}")
        ids = sorted(parse_qstat_xml(xml, None), key=int)
        if not ids:
            return []
        details = self.run(f"qstat -j {shlex.quote(','.join(ids))} -xml 2>/dev/null", timeout=60)
        return [job for job in parse_qstat_j_xml(details.stdout) if job.owner == me.strip()]

    def find_jobs(self, launch: WorkerLaunch) -> list[str]:
        directory = launch.session_dir + "/"
        return [job.id for job in self.own_jobs() if job.stdout_path.startswith(directory)]

    def error_reason(self, job_id: str) -> str:
        done = self.run(f"qstat -j {shlex.quote(job_id)} 2>/dev/null", timeout=60)
        reasons = [
            line.split(":", 1)[1].strip()
            for line in done.stdout.splitlines()
            if line.startswith("error reason")
        ]
        return "; ".join(dict.fromkeys(r.split("]: ", 1)[-1] for r in reasons)) or "no reason given"

    def cancel_task(self, job_id: str, task_id: int) -> None:
        self.run(f"qdel {shlex.quote(job_id)} -t {int(task_id)} >/dev/null 2>&1", timeout=60)

    def accounting(self, job_id: str, task_id: int) -> dict[str, str]:
        done = self.run(f"qacct -j {shlex.quote(job_id)} -t {int(task_id)} 2>/dev/null", timeout=60)
        return parse_qacct(done.stdout)


def _task_ids(text: str) -> list[int]:
    """'3' -> [3]; '2-8:2' -> [2, 4, 6, 8]; '1,4-5:1' -> [1, 4, 5]."""
    ids: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if match:
            first = int(match.group(1))
            last = int(match.group(2) or first)
            ids.extend(range(first, last + 1, int(match.group(3) or 1)))
    return ids


def parse_qstat_xml(text: str, job_ids: set[str] | None) -> JobStates:
    """Task states of the given jobs (of all listed jobs with None) from ``qstat -xml`` output."""
    states: JobStates = {}
    for entry in ET.fromstring(text).iter("job_list"):
        job = (entry.findtext("JB_job_number") or "").strip()
        if not job or (job_ids is not None and job not in job_ids):
            continue
        code = entry.findtext("state") or ""
        if "E" in code:
            state = TaskState.ERROR
        elif entry.get("state") == "running" or "r" in code or "t" in code:
            state = TaskState.RUNNING
        else:
            state = TaskState.QUEUED
        tasks = _task_ids(entry.findtext("tasks") or "1")
        for task in tasks:
            states.setdefault(job, {})[task] = state
    return states


def parse_qacct(text: str) -> dict[str, str]:
    """The key/value lines of ``qacct -j`` output (the last record when several)."""
    record: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("====="):
            record = {}
            continue
        key, _, value = line.partition(" ")
        if key:
            record[key] = value.strip()
    return record


@dataclass(frozen=True)
class JobInfo:
    """What ``qstat -j`` says about a job that matters here."""

    id: str
    name: str
    owner: str
    #: The first ``-o`` path, as given (``$JOB_ID`` and ``$TASK_ID`` unexpanded).
    stdout_path: str


def parse_qstat_j_xml(text: str) -> list[JobInfo]:
    """The jobs in ``qstat -j IDS -xml`` output (none for ``unknown_jobs`` or unreadable output)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return []
    return [
        JobInfo(
            (element.findtext("JB_job_number") or "").strip(),
            (element.findtext("JB_job_name") or "").strip(),
            (element.findtext("JB_owner") or "").strip(),
            (element.findtext("JB_stdout_path_list/path_list/PN_path") or "").strip(),
        )
        for element in root.findall("./djob_info/element")
    ]
