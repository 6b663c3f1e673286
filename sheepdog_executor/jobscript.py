"""Render the array job's script: Grid Engine options, the user's set-up lines, the worker launch."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sheepdog_executor.errors import ConfigurationError

#: C0 control characters and DEL: a newline or CR starts a new line of the job script (``shlex.quote``
#: keeps them), a NUL cuts it. A tab is allowed in ``setup`` lines only, where it is indentation.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check_no_control_characters(option: str, value: Any, *, lines: bool = False) -> None:
    """Raise ConfigurationError naming ``option`` if ``value`` (a string, or the strings of a
    sequence or mapping, keys included) holds a control character. With ``lines``, each string is one
    shell line, so a tab may stay."""
    pattern = _CONTROL_BUT_TAB if lines else _CONTROL
    if isinstance(value, str):
        strings: list[str] = [value]
    elif isinstance(value, Mapping):
        strings = [str(part) for item in value.items() for part in item]
    elif isinstance(value, Sequence):
        strings = [str(item) for item in value]
    else:
        return
    for text in strings:
        found = pattern.search(text)
        if found:
            fix = (
                "give one shell line per item (setup=[...])"
                if lines
                else "remove it: it would end the line of the job script it goes into"
            )
            raise ConfigurationError(
                f"{option}= contains the control character {found.group()!r} in {text!r}; {fix}"
            )


#: Exit status of a task whose set-up line failed (never 99 or 100: Grid Engine would requeue or
#: hold the job).
SETUP_FAILED_EXIT = 97
_SETUP_FAILED = re.compile(r"^sheepdog: set-up line (\d+) failed with exit status (\d+): (.*)$", re.M)


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
    #: The shell that runs the set-up lines: a login bash by default, so the site's profile
    #: defines ``module`` (and conda's hook) as in an interactive login.
    setup_shell: str = "/bin/bash -l"
    #: The Python interpreter on the nodes.
    python: str = "python3"

    def __post_init__(self) -> None:
        # every option reaches the job script, whatever the scheduler: none may break a line of it
        for option in fields(self):
            check_no_control_characters(option.name, getattr(self, option.name), lines=option.name == "setup")

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
    #: SHA-256 (hex) of the bundle the client wrote; the task refuses to run any other.
    bundle_sha256: str | None = None

    @property
    def bundle_path(self) -> str:
        return f"{self.session_dir}/bundle.zip"

    @property
    def secret_path(self) -> str:
        return f"{self.session_dir}/secret"

    def output_path(self, job_id: str, task_id: int | str, stream: str) -> str:
        """Where task ``task_id`` of ``job_id`` writes ``stream`` ("out" or "err")."""
        return f"{self.session_dir}/task-{job_id}-{task_id}.{stream}"


#: Exit status of a task whose bundle is not the client's (never 99 or 100: Grid Engine requeues or
#: holds a job that exits with those).
BUNDLE_MISMATCH_EXIT = 3


def worker_command(options: JobOptions, launch: WorkerLaunch) -> str:
    """The shell lines that check the worker bundle (when its digest is known) and start one worker."""
    argv = [options.python, launch.bundle_path, launch.url, launch.secret_path]
    if launch.fingerprint:
        argv.append(launch.fingerprint)
    start = "exec " + " ".join(shlex.quote(a) for a in argv)
    if not launch.bundle_sha256:
        return start
    bundle = shlex.quote(launch.bundle_path)
    message = (
        "sheepdog: the worker bundle %s is not the one this client wrote (SHA-256 %s, expected %s): "
        "refusing to run it\\n"
    )
    check = (
        f"d=$( (sha256sum {bundle} || shasum -a 256 {bundle}) 2>/dev/null | cut -c1-64)\n"
        f'[ "$d" = {launch.bundle_sha256} ] || {{ printf {shlex.quote(message)} {bundle} "${{d:-unknown}}" '
        f"{launch.bundle_sha256} >&2; exit {BUNDLE_MISMATCH_EXIT}; }}"
    )
    return check + "\n" + start


def with_setup(options: JobOptions, command: str) -> str:
    """``command`` after the set-up lines, for any POSIX ``sh``: the lines run in ``setup_shell``
    (bash, whatever shell the scheduler starts), in order, each once the lines so far form complete
    commands (so ``if ...; then`` / ``...`` / ``fi`` may span lines); the first that fails (or exits)
    stops the task with a line on stderr naming it and its exit status (see ``setup_failure``)."""
    if not options.setup:
        return command
    steps = [
        "_sheepdog_fail() { trap - EXIT; printf 'sheepdog: set-up line %s failed with exit status %s: "
        f'%s\\n\' "$_sheepdog_n" "$1" "$_sheepdog_line" >&2; exit {SETUP_FAILED_EXIT}; }}',
        # a line may `exit` the shell itself: report that too, and never with the status of the line
        # (99 and 100 mean requeue and error state to Grid Engine)
        'trap \'_sheepdog_s=$?; [ "$_sheepdog_s" = 0 ] || _sheepdog_fail "$_sheepdog_s"\' EXIT',
        # add a line; true when the lines added so far are complete commands (or this is the last)
        "_sheepdog_add() { _sheepdog_buf=${_sheepdog_buf:+$_sheepdog_buf$'\\n'}$2; "
        ': "${_sheepdog_first:=$1}"; [ "$3" = last ] || '
        '"${BASH:-bash}" -n -c "$_sheepdog_buf" 2>/dev/null; }',
    ]
    for number, line in enumerate(options.setup, 1):
        last = " last" if number == len(options.setup) else ""
        steps.append(
            # evaluated here, not in a function: what `source` and `module load` set must persist
            f"_sheepdog_add {number} {shlex.quote(line)}{last} && {{ _sheepdog_n=$_sheepdog_first "
            '_sheepdog_line=$_sheepdog_buf _sheepdog_buf= _sheepdog_first=; eval "$_sheepdog_line" '
            "|| _sheepdog_fail $?; }"
        )
    steps.append("trap - EXIT")
    shell = " ".join(shlex.quote(word) for word in shlex.split(options.setup_shell))
    return f"exec {shell} -c {shlex.quote(chr(10).join([*steps, command]))}"


@dataclass(frozen=True)
class SetupFailure:
    """A set-up line that failed, as the task reported it on stderr."""

    number: int
    status: int
    line: str


def setup_failure(stderr: str) -> SetupFailure | None:
    """The set-up line a task reported failing in its stderr (the last such report), if any."""
    found = _SETUP_FAILED.findall(stderr)
    if not found:
        return None
    number, status, line = found[-1]
    return SetupFailure(int(number), int(status), line)


def task_body(options: JobOptions, launch: WorkerLaunch) -> str:
    """The scheduler-neutral body of a task's script: the set-up lines, then the worker."""
    return with_setup(options, worker_command(options, launch))


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
    lines.append(task_body(options, launch))
    return "\n".join(lines) + "\n"
