"""Render the array job's script: Grid Engine options, the user's set-up lines, the worker launch."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobOptions:
    """How each array task is requested and prepared on the cluster."""

    job_name: str = "sheepdog"
    queue: str | None = None
    #: ``-l`` resources, e.g. ``{"h_vmem": "2G", "h_rt": "1:00:00"}`` or ``["h_vmem=2G"]``.
    resources: Mapping[str, str] | Sequence[str] = field(default_factory=dict)
    parallel_environment: str | None = None
    slots: int = 1
    working_directory: str | None = None
    qsub_args: Sequence[str] = ()
    #: Shell lines run before the worker: ``module load python``, ``source venv/bin/activate``, ...
    setup: Sequence[str] = ()
    #: The Python interpreter on the nodes.
    python: str = "python3"

    def resource_list(self) -> list[str]:
        if isinstance(self.resources, Mapping):
            return [f"{key}={value}" for key, value in self.resources.items()]
        return list(self.resources)


@dataclass(frozen=True)
class WorkerLaunch:
    """Where a task finds the worker and how it reaches the client; nothing here is secret."""

    session_dir: str
    url: str
    fingerprint: str | None = None

    @property
    def bundle_path(self) -> str:
        return f"{self.session_dir}/bundle.zip"

    @property
    def secret_path(self) -> str:
        return f"{self.session_dir}/secret"

    def output_path(self, job_id: str, task_id: int | str, stream: str) -> str:
        """Where task ``task_id`` of ``job_id`` writes ``stream`` ("out" or "err")."""
        return f"{self.session_dir}/task-{job_id}-{task_id}.{stream}"


def worker_command(options: JobOptions, launch: WorkerLaunch) -> str:
    """The shell command that starts one worker."""
    argv = [options.python, launch.bundle_path, launch.url, launch.secret_path]
    if launch.fingerprint:
        argv.append(launch.fingerprint)
    return "exec " + " ".join(shlex.quote(a) for a in argv)


def render_gridengine(options: JobOptions, launch: WorkerLaunch, tasks: int) -> str:
    """The script handed to ``qsub`` on stdin for an array job of ``tasks`` workers."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "#$ -S /bin/sh",
        f"#$ -N {q(options.job_name)}",
        f"#$ -t 1-{tasks}",
        f"#$ -o {q(launch.output_path('$JOB_ID', '$TASK_ID', 'out'))}",
        f"#$ -e {q(launch.output_path('$JOB_ID', '$TASK_ID', 'err'))}",
    ]
    if options.working_directory:
        lines.append(f"#$ -wd {q(options.working_directory)}")
    if options.queue:
        lines.append(f"#$ -q {q(options.queue)}")
    for resource in options.resource_list():
        lines.append(f"#$ -l {q(resource)}")
    if options.parallel_environment:
        lines.append(f"#$ -pe {q(options.parallel_environment)} {int(options.slots)}")
    if options.qsub_args:
        lines.append("#$ " + " ".join(q(a) for a in options.qsub_args))
    lines += list(options.setup)
    lines.append(worker_command(options, launch))
    return "\n".join(lines) + "\n"
