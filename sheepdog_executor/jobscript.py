"""The scheduler-neutral part of an array task's script: identity, set-up lines, the worker launch.

Each scheduler module (``scheduler/gridengine.py``, ``scheduler/slurm.py``) writes its own directive
lines and calls ``render_script`` with them, so what the body does (set-up, checks, the worker) is the
same under every scheduler, and under ``LocalScheduler`` (``task_body``).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sheepdog_executor.errors import ConfigurationError
from sheepdog_executor.resources import Resources

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


def check_options(options: Any) -> None:
    """Check every field of an options dataclass (``JobOptions``, a scheduler's own options): each
    reaches the job script, whatever the scheduler, and none may break a line of it."""
    for option in fields(options):
        check_no_control_characters(option.name, getattr(options, option.name), lines=option.name == "setup")


#: Exit status of a task whose set-up line failed (never 99 or 100: Grid Engine would requeue or
#: hold the job).
SETUP_FAILED_EXIT = 97
_SETUP_FAILED = re.compile(r"^sheepdog: set-up line (\d+) failed with exit status (\d+): (.*)$", re.M)


@dataclass(frozen=True)
class JobOptions:
    """How each array task is prepared, whatever the scheduler (its own options live with it)."""

    job_name: str = "sheepdog"
    working_directory: str | None = None
    #: Shell lines run before the worker: ``module load python``, ``source venv/bin/activate``, ...
    setup: Sequence[str] = ()
    #: The shell that runs the set-up lines: a login bash by default, so the site's profile
    #: defines ``module`` (and conda's hook) as in an interactive login.
    setup_shell: str = "/bin/bash -l"
    #: The Python interpreter on the nodes.
    python: str = "python3"
    #: What each task asks for (``time=``, ``mem=``, ``cpus=``, ``gpus=``), in every scheduler's words.
    needs: Resources = Resources()

    def __post_init__(self) -> None:
        check_options(self)
        if not shlex.split(self.setup_shell or ""):
            raise ConfigurationError(
                "setup_shell must name a shell, e.g. '/bin/bash -l' (the default) or 'bash'"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> JobOptions:
        """The fields found in an executor's options (the others ignored); ``setup`` may be a line."""
        names = {f.name for f in dataclasses.fields(cls)} - {"needs"}
        found: dict[str, Any] = {k: v for k, v in options.items() if k in names and v is not None}
        found["needs"] = Resources.parse(options)
        if isinstance(found.get("setup"), str):
            found["setup"] = [found["setup"]]
        if "setup" in found:
            found["setup"] = tuple(found["setup"])
        return cls(**found)


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


#: Bytes of each of the captured stdout and stderr a task prints when its worker dies (the client
#: reads the last ``WORKER_DEATH_TAIL`` bytes of the task's stderr file).
CAPTURE_TAIL = 1500
WORKER_DEATH_TAIL = 8000
_WORKER_ENDED = re.compile(r"^sheepdog: the worker ended with exit status (\d+)", re.M)

# The worker runs as a child of the task's shell, not exec'd, so that when it dies (a segfault, a
# native library's abort, a kill over memory, os._exit) the shell still tells its story on the task's
# stderr: what the calls running then had written (the worker captures their stdout and stderr in
# two files the shell made and unlinked at once, so nothing is left behind even after a SIGKILL),
# and the exit status with the signal's name; then it ends by the same signal, so the scheduler's
# accounting shows what happened to the worker. faulthandler, enabled by the worker, has written the
# Python traceback of the crashing thread there already. Never 99 or 100 as the task's own exit
# status: Grid Engine would requeue the job or hold it in an error state for ever.
_WORKER_REPORT = f"""_sheepdog_ended() {{
  _sheepdog_s=$1
  if [ "$_sheepdog_s" -ne 0 ]; then
    if [ -n "$2" ]; then
      for _sheepdog_f in "3 stdout" "4 stderr"; do
        set -- $_sheepdog_f
        if [ -s "/dev/fd/$1" ]; then
          printf 'sheepdog: what the running calls wrote to %s before the worker ended (tail):\\n' "$2" >&2
          tail -c {CAPTURE_TAIL} "/dev/fd/$1" >&2; echo >&2
        fi
      done
    fi
    _sheepdog_sig=
    [ "$_sheepdog_s" -gt 128 ] && _sheepdog_sig=$(kill -l $((_sheepdog_s - 128)) 2>/dev/null)
    printf 'sheepdog: the worker ended with exit status %s%s\\n' "$_sheepdog_s" \\
      "${{_sheepdog_sig:+ (killed by signal SIG${{_sheepdog_sig#SIG}})}}" >&2
  fi
  if [ -n "$_sheepdog_sig" ]; then  # end as the worker did, so the accounting says so too
    ulimit -c 0 2>/dev/null; trap - "$_sheepdog_sig" 2>/dev/null; kill -s "$_sheepdog_sig" $$
  fi
  case $_sheepdog_s in 99|100) exit 1;; esac
  exit "$_sheepdog_s"
}}
_sheepdog_o=$(mktemp "${{TMPDIR:-/tmp}}/sheepdog-stdout.XXXXXX" 2>/dev/null) || _sheepdog_o=
_sheepdog_e=$(mktemp "${{TMPDIR:-/tmp}}/sheepdog-stderr.XXXXXX" 2>/dev/null) || _sheepdog_e=
if [ -n "$_sheepdog_o" ] && [ -n "$_sheepdog_e" ]; then
  {{
    rm -f "$_sheepdog_o" "$_sheepdog_e"
    SHEEPDOG_CAPTURE_FDS=3,4; export SHEEPDOG_CAPTURE_FDS
    @WORKER@
    _sheepdog_ended $? captured
  }} 3<>"$_sheepdog_o" 4<>"$_sheepdog_e"
else
  rm -f ${{_sheepdog_o:+"$_sheepdog_o"}} ${{_sheepdog_e:+"$_sheepdog_e"}}
  unset SHEEPDOG_CAPTURE_FDS
  @WORKER@
  _sheepdog_ended $?
fi"""


def worker_command(options: JobOptions, launch: WorkerLaunch) -> str:
    """The shell lines that check the worker bundle (when its digest is known), start one worker
    and, if it dies, report how (see ``_WORKER_REPORT``)."""
    argv = [options.python, launch.bundle_path, launch.url, launch.secret_path]
    if launch.fingerprint:
        argv.append(launch.fingerprint)
    start = _WORKER_REPORT.replace("@WORKER@", " ".join(shlex.quote(a) for a in argv))
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


def worker_exit_status(stderr: str) -> int | None:
    """The worker's exit status as its task's shell reported it on stderr (the last report), if any."""
    found = _WORKER_ENDED.findall(stderr)
    return int(found[-1]) if found else None


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


#: What numerical libraries read for their number of threads (OpenMP, OpenBLAS, MKL, BLIS, Apple's
#: Accelerate, numexpr). Each defaults to the cores the scheduler granted the task, not the node's.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def thread_limits(cpus: str) -> str:
    """Shell lines that set ``SHEEPDOG_CPUS`` to ``cpus`` (a shell expression of the scheduler's own
    variable) and each of ``THREAD_VARIABLES`` to it unless it is set already: numpy on a 64-core
    node then runs as many threads as the task has cores, not 64 in each of its neighbours' tasks.
    The set-up lines run after these and may set them again."""
    defaults = "; ".join(f': "${{{name}:=$SHEEPDOG_CPUS}}"' for name in THREAD_VARIABLES)
    return f'SHEEPDOG_CPUS="{cpus}"; {defaults}\nexport SHEEPDOG_CPUS {" ".join(THREAD_VARIABLES)}'


def render_script(
    directives: Sequence[str],
    job_id: str,
    task_id: str,
    cpus: str,
    options: JobOptions,
    launch: WorkerLaunch,
    environment: Mapping[str, str] | None = None,
) -> str:
    """A whole array-task script: the scheduler's ``directives`` (``#$ ...``, ``#SBATCH ...``), the
    variables it exports for the worker first thing (``environment``: name -> a shell word, e.g.
    ``SHEEPDOG_DEADLINE``, see ``Scheduler.task_environment``), the task's identity as
    ``SHEEPDOG_JOB_ID``/``SHEEPDOG_TASK_ID`` (the only names the worker reads;
    ``job_id``/``task_id`` are shell expressions of the scheduler's own variables), its cores
    (``cpus``, likewise) as the default of the thread counts of numerical libraries, then the body."""
    lines = ["#!/bin/sh", *directives]
    for name, word in (environment or {}).items():
        lines.append(f"{name}={word}; export {name}")
    lines.append(f'SHEEPDOG_JOB_ID="{job_id}"; SHEEPDOG_TASK_ID="{task_id}"')
    lines.append("export SHEEPDOG_JOB_ID SHEEPDOG_TASK_ID")
    # the resource set whose calls the worker takes (always set: sbatch passes on the submitter's)
    lines.append(f"SHEEPDOG_RESOURCE_SET={shlex.quote(options.needs.label())}; export SHEEPDOG_RESOURCE_SET")
    lines.append(thread_limits(cpus))
    lines.append(task_body(options, launch))
    return "\n".join(lines) + "\n"
