"""The ``sheepdog-executor`` command.

``doctor HOST`` checks, in the order an executor needs them, everything between this client and the
nodes, and says what to change at the first thing that is wrong. ``cleanup HOST`` removes the jobs and
session directories of clients that died without shutting down (SIGKILL, a lost laptop, a crashed
kernel): only the user's own jobs, only those that run our worker from a session directory, and only
when the session's client is known to be gone, as seen from where cleanup stands: the home directory
may be shared with other clusters and head nodes, whose sessions it lists as kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import re
import shlex
import socket
import sys
import time
import urllib.parse
import zipfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from sheepdog_executor.config import (
    config_path,
    configured_scheduler,
    env_name,
    environment_options,
    resolve_options,
)
from sheepdog_executor.environment import ENVIRONMENT_RECORD, HeadNode
from sheepdog_executor.errors import (
    ConfigurationError,
    ConnectionFailed,
    SchedulerError,
    SheepdogError,
    UnknownHostKey,
    WorkerStartFailed,
)
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch, with_setup
from sheepdog_executor.liveness import probe_client
from sheepdog_executor.options import ExecutorOptions, defaults, lines
from sheepdog_executor.scheduler import Scheduler, SessionJob, TaskState
from sheepdog_executor.scheduler.base import plain_name
from sheepdog_executor.sessiondir import OWNER_RECORD, Owner, make_session_dir, prepare_root
from sheepdog_executor.shell import Shell, SSHShell, connect

if TYPE_CHECKING:
    from sheepdog_executor.executor import ClusterExecutor

#: The file in a session directory that holds the client's endpoint URL (see ``cleanup``).
ENDPOINT_RECORD = "endpoint"
#: A doctor probe directory this old (minutes) without jobs is left over from a doctor that died.
DOCTOR_LEFTOVER_MINUTES = 10
_PROBE_MAIN = (
    "import socket, sys\n"
    'sys.stdout.write("sheepdog-probe %d.%d.%d %s\\n" % (sys.version_info[0], sys.version_info[1], '
    "sys.version_info[2], socket.gethostname()))\n"
)
_PROBE_LINE = re.compile(r"^sheepdog-probe (\d+)\.(\d+)\.(\d+) (\S+)$", re.M)
_VERSION_SNIPPET = 'import sys; print("%d.%d.%d" % tuple(sys.version_info[:3]))'


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 when everything is fine)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command == "doctor":
        explicit = {"python": args.python, "callback_address": args.callback_address}
        explicit = {k: v for k, v in explicit.items() if v is not None}
        return Doctor(args.host, explicit, args.timeout, scheduler=args.scheduler).run()
    if args.command == "cleanup":
        return cleanup(
            args.host, dry_run=args.dry_run, force=args.force, envs=args.envs, choice=args.scheduler
        )
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    from sheepdog_executor import __version__

    parser = argparse.ArgumentParser(
        prog="sheepdog-executor",
        description="Check a cluster for an executor, or clean up after crashed clients.",
    )
    parser.add_argument("--version", action="version", version=f"sheepdog-executor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done (debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    doctor = _host_command(
        commands,
        "doctor",
        help="check SSH, the scheduler, the nodes' Python and the way back to this client",
        description="Check, in order, what an executor on HOST needs; stop at the first "
        "failure and say what to change. Options come from the config file and SHEEPDOG_* variables.",
    )
    doctor.add_argument("--python", metavar="PY", help="the interpreter on the nodes (python=)")
    doctor.add_argument(
        "--callback-address", metavar="ADDR", help="address of this machine the nodes connect to"
    )
    doctor.add_argument(
        "--timeout", type=float, default=90.0, metavar="S", help="seconds a test job may take (90)"
    )
    clean = _host_command(
        commands,
        "cleanup",
        help="remove jobs and session directories left by clients that died",
        description="Remove your jobs that run a sheepdog worker from a session directory whose "
        "client is gone, and session directories left without a client.",
    )
    clean.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    clean.add_argument(
        "--force",
        action="store_true",
        help="also remove sessions whose client cannot be checked (never those known to be alive)",
    )
    clean.add_argument(
        "--envs",
        action="store_true",
        help='also remove the environments of environment="sync" (rebuilt when next needed)',
    )
    return parser


def _host_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand that works on one head node: its HOST and --scheduler arguments."""
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("host", metavar="HOST", help="host name or ~/.ssh/config alias of the head node")
    parser.add_argument(
        "--scheduler",
        choices=("auto", "gridengine", "slurm"),
        default="auto",
        help="the head node's scheduler (auto: the one whose commands it has; Grid Engine if both)",
    )
    return parser


# -- shared -------------------------------------------------------------------------------------
class CheckFailed(SheepdogError):
    """A doctor check failed: what was seen, and what to change."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def _connect(host: str, options: Mapping[str, Any]) -> SSHShell:
    shell = connect(host, options)
    assert isinstance(shell, SSHShell)  # a host was given
    return shell


def _executors() -> dict[str, type[ClusterExecutor]]:
    """The executors the commands know, by the name ``--scheduler`` takes."""
    from sheepdog_executor.executor import GridEngineExecutor, SlurmExecutor

    return {"gridengine": GridEngineExecutor, "slurm": SlurmExecutor}


def detect_executor(
    shell: Shell, options: Mapping[str, Any], choice: str, host: str = ""
) -> tuple[type[ClusterExecutor], str]:
    """The executor for ``--scheduler`` ``choice``; with "auto", the one the config file names for
    ``host`` (``configured_scheduler``), else the one whose submit command the head node has (Grid
    Engine when it has both). Returns it and a note on how it was chosen."""
    executors = _executors()
    if choice != "auto":
        return executors[choice], "chosen by --scheduler"
    configured = configured_scheduler(host) if host else None
    if configured is not None:
        return executors[configured[0]], f"chosen by {configured[1]}"
    probe = "; ".join(
        f"command -v {cls.scheduler_class.commands[0]} >/dev/null && echo {name}"
        for name, cls in executors.items()
    )
    found = shell.run("\n".join([*lines(options.get("command_setup", ())), probe]), timeout=60).stdout.split()
    if len(found) > 1:
        return executors[found[0]], (
            f"{' and '.join(found)} found, checking {found[0]} (--scheduler, or scheduler = "
            f'"..." under [hosts."{host}"] in {config_path()}, chooses)'
        )
    return executors[found[0] if found else "gridengine"], ""


def _own_options(options: Mapping[str, Any], cls: type[ClusterExecutor]) -> dict[str, Any]:
    """``options`` without those of other schedulers' executors (a shared [default] table has them)."""
    from sheepdog_executor.config import OPTIONS

    name = cls.scheduler_class.name
    return {k: v for k, v in options.items() if k not in OPTIONS or OPTIONS[k].scheduler in ("", name)}


def _scheduler(
    shell: Shell, options: Mapping[str, Any], job_options: JobOptions, cls: type[Scheduler]
) -> Scheduler:
    """The scheduler an executor with these options would use (its own options checked)."""
    return cls(shell, job_options, options.get("command_setup", ()), cls.site_options(options))


def executor_default(option: str) -> Any:
    """An executor's own default for an option, from its declaration (``options.py``)."""
    return defaults(ExecutorOptions)[option]


def _session_root(shell: Shell, options: Mapping[str, Any]) -> str:
    """The session root on the head node with ``~`` expanded and symbolic links resolved, as the
    executor names its session directories."""
    root = str(options.get("session_root", executor_default("session_root")))
    if root.startswith("~"):
        home = shell.run('printf %s "$HOME"', timeout=30).stdout.strip() or "."
        root = root.replace("~", home, 1)
    resolved = shell.run(f"cd -P -- {shlex.quote(root)} 2>/dev/null && pwd", timeout=30).stdout.strip()
    return resolved or root.rstrip("/") or "/"


def _indent(text: str) -> str:
    return text.strip().replace("\n", "\n" + " " * 16)


# -- doctor -------------------------------------------------------------------------------------
class Doctor:
    """The checks of ``sheepdog-executor doctor``, each a method that returns a detail or raises
    CheckFailed; they run in order and the first failure ends the run."""

    def __init__(
        self,
        host: str,
        explicit: Mapping[str, Any],
        timeout: float,
        out: TextIO | None = None,
        scheduler: str = "auto",
    ) -> None:
        self.host = host
        self.choice = scheduler
        self.explicit = dict(explicit)
        self.timeout = timeout
        self.out = out or sys.stdout
        self.options: dict[str, Any] = {}
        self.job_options = JobOptions()
        self.executor_class = _executors()["gridengine" if scheduler == "auto" else scheduler]
        self.shell: SSHShell | None = None
        self.scheduler: Scheduler | None = None

    def run(self) -> int:
        checks: list[tuple[str, Callable[[], str]]] = [
            ("config", self.check_config),
            ("ssh", self.check_ssh),
            ("scheduler", self.check_scheduler),
            ("python", self.check_python),
            ("callback", self.check_callback),
        ]
        try:
            for name, check in checks:
                try:
                    detail = check()
                except CheckFailed as failure:
                    self._line("FAIL", name, failure.detail)
                    self._line("", "fix:", failure.fix)
                    return 1
                except Exception as exc:  # noqa: BLE001 - a doctor reports, it does not crash
                    self._line("FAIL", name, f"unexpected {type(exc).__name__}: {exc}")
                    self._line("", "fix:", "run again with -v and report this as a bug if it persists")
                    return 1
                self._line("ok", name, detail)
        finally:
            if self.shell is not None:
                self.shell.close()
        name = self.executor_class.__name__
        scheduler = self.executor_class.scheduler_class.name
        print(f"all checks passed on {scheduler}: {name}(host={self.host!r}) should work", file=self.out)
        return 0

    def _line(self, status: str, name: str, detail: str) -> None:
        print(f"{status:<5} {name:<9} {_indent(detail)}", file=self.out, flush=True)

    # -- the checks -----------------------------------------------------------------------------
    def check_config(self) -> str:
        path = config_path()
        try:
            self.options = resolve_options(self.host, self.explicit)
            self.job_options = JobOptions.from_options(self.options)
        except ConfigurationError as exc:
            raise CheckFailed(str(exc), "correct the file or variable named above") from exc
        used = [env_name(k) for k in environment_options()]
        source = f"{path}" if path.exists() else f"no {path}, built-in defaults"
        return source + (f"; from the environment: {', '.join(used)}" if used else "")

    def check_ssh(self) -> str:
        import paramiko

        try:
            self.shell = _connect(self.host, self.options)
        except UnknownHostKey as exc:
            raise CheckFailed(
                str(exc),
                f"check the key's fingerprint with the cluster's admins, then run `ssh {self.host}` once "
                "and accept it",
            ) from exc
        except ConnectionFailed as exc:
            if isinstance(exc.__cause__, paramiko.AuthenticationException):
                fix = (
                    f"make `ssh {self.host}` log in without a password prompt: `ssh-copy-id {self.host}`, "
                    f"or User/IdentityFile under `Host {self.host}` in ~/.ssh/config (or user=/key_filename= "
                    "in the config file)"
                )
            else:
                fix = (
                    f"check HostName and Port of {self.host} (`ssh -G {self.host}` shows what is used), "
                    f"your network or VPN, and that `ssh {self.host}` works from this machine"
                )
            raise CheckFailed(str(exc), fix) from exc
        who = self.shell.run("id -un", timeout=30)
        if who.returncode != 0:
            raise CheckFailed(
                f"logged in, but a command failed (exit {who.returncode}): {who.stderr.strip()}",
                f"make non-interactive commands work: `ssh {self.host} id -un` must print your user name",
            )
        target = self.shell.target
        return f"{who.stdout.strip()}@{target.hostname}:{target.port} ({self.host})"

    def check_scheduler(self) -> str:
        assert self.shell is not None
        self.executor_class, note = detect_executor(self.shell, self.options, self.choice, self.host)
        cls = self.executor_class.scheduler_class
        try:
            self.scheduler = _scheduler(self.shell, self.options, self.job_options, cls)
        except ConfigurationError as exc:
            raise CheckFailed(str(exc), "correct the file or variable named above") from exc
        try:
            self.scheduler.prepare()
        except SchedulerError as exc:
            raise CheckFailed(
                str(exc),
                f"add {cls.name} to PATH for non-interactive logins, or the line that sets it up as "
                f'command_setup = ["..."] under [hosts."{self.host}"] in {config_path()}',
            ) from exc
        version = self.scheduler.version()
        found = f"{cls.name}: {', '.join(cls.commands)} found ({version or 'version unknown'})"
        return found + (f"; {note}" if note else "")

    def check_python(self) -> str:
        assert self.shell is not None
        python = self.job_options.python
        client = sys.version_info
        wanted = f"{client.major}.{client.minor}"
        head = self._head_python()
        version, node, job_id, stderr = self._probe_job()
        on_head = f"{head[0]} on the head node" if head[0] else f"not runnable on the head node ({head[1]})"
        if version is None:
            raise CheckFailed(
                f"{python} did not run in test job {job_id}; {on_head}\nstderr of the job:\n"
                + (stderr.strip() or "(empty)"),
                f"pass --python (python = in the config file) the path of a Python {wanted} on the "
                'nodes, or setup lines that provide one (e.g. setup = ["module load python"])',
            )
        if tuple(int(p) for p in version.split(".")[:2]) != (client.major, client.minor):
            raise CheckFailed(
                f"the nodes run Python {version} ({python} in test job {job_id} on {node}), this client "
                f"runs Python {client.major}.{client.minor}.{client.micro}; {on_head}",
                f"pickled calls only travel between equal minor versions: point python= at a Python "
                f"{wanted} on the nodes (or setup= lines that load one), or run this client with "
                f"Python {'.'.join(version.split('.')[:2])}",
            )
        return (
            f"Python {version} in test job {job_id} on {node}, {on_head}; this client runs "
            f"{client.major}.{client.minor}.{client.micro}"
        )

    def check_callback(self) -> str:
        from sheepdog_executor.tunnel import choose_route

        assert self.shell is not None and self.scheduler is not None
        address = self.options.get("callback_address") or self.shell.callback_address()
        port = int(self.options.get("callback_port", executor_default("callback_port")))
        mode = self.options.get("callback", executor_default("callback"))
        try:  # decided here once (auto probes from the head node), so it can be reported
            route = choose_route(self.shell, mode, address, port)
        except ConfigurationError as exc:
            raise CheckFailed(str(exc), "set callback to 'auto', 'direct' or 'tunnel'") from exc
        if route.mode == "direct":
            how = f"directly to {address}"
            fix = (
                "the nodes must open TCP connections to this machine: pass --callback-address "
                "(callback_address = in the config file) an address of it they can route to and let its "
                'firewall accept them, or use callback = "tunnel" to come back through the SSH connection'
            )
            try:  # the executor would find out too, but only after it made its session directory
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((address, port))
            except OSError as exc:
                raise CheckFailed(
                    f"this client cannot listen on {address}:{port}: {exc}",
                    "pass --callback-address (callback_address = in the config file) an address of "
                    'this machine (see `ip -brief address`), or use callback = "tunnel"',
                ) from exc
        else:
            how = "through the SSH connection (tunnel and relay on the head node)"
            how += f"; a direct connection is impossible: {route.why}" if route.why else ""
            fix = (
                "the nodes must reach the relay's port on the head node: ask the admins whether a "
                'firewall between nodes and head node blocks it, or use callback = "direct" with a '
                "--callback-address of this machine the nodes can reach"
            )
        options = {
            **_own_options(self.options, self.executor_class),
            "max_workers": 1,
            "callback": route.mode,
        }
        started = time.monotonic()
        try:
            executor = self.executor_class(host=self.host, **options)
        except SheepdogError as exc:
            raise CheckFailed(
                f"the executor did not start: {exc}", "fix what the message says and run doctor again"
            ) from exc
        with executor:  # leaving by an exception aborts: the job is removed at once
            future = executor.submit(socket.gethostname)
            try:
                node = future.result(self.timeout)
            except FuturesTimeout:
                raise CheckFailed(self._silence(executor.job_ids, executor.session_dir, how), fix) from None
            except WorkerStartFailed as exc:
                raise CheckFailed(f"the test job's worker never came back {how}:\n{exc}", fix) from exc
            except Exception as exc:
                raise CheckFailed(
                    f"the test call failed: {type(exc).__name__}: {exc}",
                    "fix what the message says and run doctor again",
                ) from exc
        return f"a call ran on {node} and came back {how}, {time.monotonic() - started:.1f} s after the start"

    # -- helpers ------------------------------------------------------------------------------
    def _head_python(self) -> tuple[str | None, str]:
        """(version, why not) of the interpreter on the head node, after the set-up lines."""
        assert self.shell is not None
        command = f"{shlex.quote(self.job_options.python)} -c {shlex.quote(_VERSION_SNIPPET)}"
        done = self.shell.run(with_setup(self.job_options, command), timeout=60)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines and re.fullmatch(r"\d+\.\d+\.\d+", lines[-1]):
            return lines[-1], ""
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return None, why

    def _probe_job(self) -> tuple[str | None, str, str, str]:
        """Run the interpreter in one job shaped like the executor's (same options and set-up).

        Returns (version or None, node, job id, stderr of the job)."""
        assert self.shell is not None
        shell = self.shell
        session_root = str(self.options.get("session_root", executor_default("session_root")))
        try:  # as the executor makes its session directory: the probe runs from it too
            probe_dir = make_session_dir(shell, prepare_root(shell, session_root), prefix="doctor-")
        except ConfigurationError as exc:
            raise CheckFailed(str(exc), "set session_root= to a directory only you can write") from exc
        launch = WorkerLaunch(probe_dir, "doctor-probe")
        scheduler = _scheduler(
            shell,
            self.options,
            dataclasses.replace(self.job_options, job_name="sheepdog-doctor"),
            self.executor_class.scheduler_class,
        )
        job_id = ""
        try:
            shell.put(launch.bundle_path, _probe_bundle(), 0o600)
            try:
                job_id = scheduler.submit(launch, 1)
            except SchedulerError as exc:
                raise CheckFailed(
                    f"the test job was refused: {exc}",
                    "check " + ", ".join(scheduler.option_names()) + " in your options",
                ) from exc
            self._wait_until_gone(scheduler, job_id)
            out = shlex.quote(launch.output_path(job_id, 1, "out"))
            # on a shared filesystem the output file can appear a moment after the job ended
            wait = f"for i in 1 2 3 4 5 6 7 8 9 10; do [ -e {out} ] && break; sleep 0.5; done; cat {out}"
            match = _PROBE_LINE.search(shell.run(f"{wait} 2>/dev/null", timeout=30).stdout)
            stderr = scheduler.output_tail(launch, job_id, 1)
            if match is None:
                return None, "?", job_id, stderr
            return ".".join(match.group(1, 2, 3)), match.group(4), job_id, stderr
        finally:
            if job_id and scheduler.poll([job_id]):
                scheduler.cancel([job_id])
            shell.run(f"rm -rf {shlex.quote(probe_dir)}", timeout=30)

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

    def _silence(self, job_ids: list[str], session_dir: str, how: str) -> str:
        """Why a call got no answer in time: the job is queued, or runs but never calls back."""
        assert self.scheduler is not None
        if not job_ids:
            return f"no job was submitted within {self.timeout:.0f} s"
        job_id = job_ids[-1]
        tasks = self.scheduler.poll([job_id]).get(job_id, {})
        if tasks and all(state is TaskState.QUEUED for state in tasks.values()):
            return (
                f"test job {job_id} was still waiting in the queue after {self.timeout:.0f} s; if the "
                "cluster is busy, run doctor again with a longer --timeout"
            )
        tail = self.scheduler.output_tail(WorkerLaunch(session_dir, ""), job_id, 1).strip()
        return f"test job {job_id} ran, but no answer came back {how} within {self.timeout:.0f} s" + (
            f"; stderr of the task:\n{tail}" if tail else ""
        )


def _probe_bundle() -> bytes:
    """A zip that, run as the worker bundle, prints its Python version and node and exits."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__main__.py", _PROBE_MAIN)
    return buffer.getvalue()


# -- cleanup ------------------------------------------------------------------------------------
@dataclass
class SessionDir:
    """A directory under the session root that holds a session's secret or worker bundle."""

    name: str
    endpoint: str | None
    old: bool
    #: Its owner record; None when it has none (made by an older version) or it is unreadable.
    owner: Owner | None = None


@dataclass(frozen=True)
class Here:
    """Where cleanup stands: the scheduler it asks and the head node's host name."""

    scheduler: str
    head_node: str

    def owns(self, owner: Owner) -> bool:
        return (owner.scheduler, owner.head_node) == (self.scheduler, self.head_node)


def cleanup(
    host: str,
    *,
    dry_run: bool = False,
    force: bool = False,
    envs: bool = False,
    out: TextIO | None = None,
    choice: str = "auto",
) -> int:
    """Remove what clients that died left on ``host``; return the exit status."""
    out = out or sys.stdout
    try:
        options = resolve_options(host, {})
        shell = _connect(host, options)
    except (ConfigurationError, ConnectionFailed) as exc:
        print(f"error: {exc}", file=out)
        return 1
    try:
        executor_class, _ = detect_executor(shell, options, choice, host)
        scheduler = _scheduler(shell, options, JobOptions(), executor_class.scheduler_class)
        scheduler.prepare()
        root = _session_root(shell, options)
        jobs: list[SessionJob] = scheduler.session_jobs(root)
        sessions = list_sessions(shell, root)
        here = Here(scheduler.name, shell.run("uname -n", timeout=30).stdout.strip())
        verb = "would remove" if dry_run else "removed"
        removed_jobs = removed_dirs = kept = 0
        live: set[str] = set()  # sessions kept: the environments they use are kept too
        for name in sorted(set(sessions) | {job.session for job in jobs}):
            job_ids = [job.id for job in jobs if job.session == name]
            what = ", ".join(f"job {job.id} ({job.name})" for job in jobs if job.session == name)
            verdict, why = judge_session(shell, root, name, sessions.get(name), force, here, bool(job_ids))
            if verdict == "keep":
                kept += 1
                live.add(name)
                print(f"kept {name}: {what or 'no jobs'}; {why}", file=out)
                continue
            if not dry_run:
                _remove(scheduler, shell, root, name, job_ids, name in sessions)
            removed_jobs += len(job_ids)
            removed_dirs += name in sessions
            parts = [what] if what else []
            parts += ["the directory"] if name in sessions else []
            print(f"{verb} {name}: {' and '.join(parts)}; {why}", file=out)
        print(
            f"{verb} {removed_jobs} job(s) and {removed_dirs} session directories, kept {kept} "
            f"session(s), under {root} on {host}",
            file=out,
        )
        head = HeadNode(shell, JobOptions.from_options(options), lines(options.get("command_setup", ())))
        in_use = {key: name for name, key in environments_of(shell, root).items() if name in live}
        clean_environments(head, f"{root}/envs", remove=envs, dry_run=dry_run, out=out, in_use=in_use)
        return 0
    except SheepdogError as exc:
        print(f"error: {exc}", file=out)
        return 1
    finally:
        shell.close()


def environments_of(shell: Shell, root: str) -> dict[str, str]:
    """Session name -> the KEY of the synced environment its workers run, for the sessions under
    ``root`` that recorded one."""
    script = (
        f"cd {shlex.quote(root)} 2>/dev/null || exit 0\n"
        f'for d in */; do d=${{d%/}}; [ -f "$d/{ENVIRONMENT_RECORD}" ] || continue\n'
        f'  printf "%s\\t%s\\n" "$d" "$(head -n 1 "$d/{ENVIRONMENT_RECORD}")"\n'
        "done"
    )
    found = {}
    for line in shell.run(script, timeout=60).stdout.splitlines():
        name, _, key = line.partition("\t")
        if plain_name(name) and plain_name(key.strip()):
            found[name] = key.strip()
    return found


def clean_environments(
    head: HeadNode,
    envs: str,
    *,
    remove: bool,
    dry_run: bool,
    out: TextIO,
    in_use: Mapping[str, str] | None = None,
) -> None:
    """List the synced environments under ``envs``; with ``remove``, remove them, but not one being
    built nor one a live session uses (``in_use``: KEY -> session)."""
    in_use = in_use or {}
    listed = head.tool("list", envs, timeout=60).get("envs", [])
    for env in listed:
        summary = env.get("summary", {})
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.get("created", 0)))
        count = len(summary.get("distributions", []))
        client = summary.get("client", "?")
        what = f"environment {env['name']}: {count} distributions, built {when} from {client}"
        print(what + ("" if remove else "; kept (--envs removes it)"), file=out)
    names = [env["name"] for env in listed]
    if remove:
        for name in [n for n in names if n in in_use]:
            print(f"kept environment {name}: session {in_use[name]} uses it", file=out)
        names = [n for n in names if n not in in_use]
    if remove and names and not dry_run:
        answer = head.tool("remove", envs, *names, timeout=600)
        for name in answer.get("busy", []):
            print(f"kept environment {name}: it is being built", file=out)
        names = list(answer.get("removed", []))
    verb = ("would remove" if dry_run else "removed") if remove else "listed"
    print(f"{verb} {len(names)} environment(s) under {envs}", file=out)


def list_sessions(shell: Shell, root: str) -> dict[str, SessionDir]:
    """The directories under ``root`` that hold a session's secret or worker bundle, with their
    endpoint record and whether they are older than any doctor run."""
    script = (
        f"cd {shlex.quote(root)} 2>/dev/null || exit 0\n"
        'for d in */; do d=${d%/}; [ -d "$d" ] || continue\n'
        '  [ -e "$d/secret" ] || [ -e "$d/bundle.zip" ] || continue\n'
        f'  old=$(find "$d" -maxdepth 0 -mmin +{DOCTOR_LEFTOVER_MINUTES} 2>/dev/null)\n'
        f'  printf "%s\\t%s\\t%s\\t%s\\n" "$d" "${{old:+old}}" '
        f'"$(head -n 1 "$d/{ENDPOINT_RECORD}" 2>/dev/null)" "$(head -n 1 "$d/{OWNER_RECORD}" 2>/dev/null)"\n'
        "done"
    )
    sessions = {}
    for line in shell.run(script, timeout=60).stdout.splitlines():
        name, old, endpoint, owner = (line.split("\t") + ["", "", ""])[:4]
        if plain_name(name):
            record = Owner.parse(owner) if owner.strip() else None
            sessions[name] = SessionDir(name, endpoint.strip() or None, old == "old", record)
    return sessions


def judge_session(
    shell: Shell,
    root: str,
    name: str,
    session: SessionDir | None,
    force: bool,
    here: Here,
    has_jobs: bool,
) -> tuple[str, str]:
    """("remove" or "keep", why): a session is removed only when its client is known to be gone
    from where cleanup stands (its client's pid is gone on this machine, or its client's endpoint
    is dead as its own head node sees it), or cannot be checked and ``force`` is set; a client that
    answers is never touched, nor a session of another cluster or head node (only they can tell)."""
    if session is None:
        return "remove", "its session directory is gone, so its tasks cannot start a worker"
    owner = session.owner
    if owner is not None and owner.on_this_machine() and not owner.client_runs():
        elsewhere = "" if here.owns(owner) else f"; its jobs on {owner.where()} are for a cleanup there"
        return "remove", f"its client (pid {owner.client_pid} on this machine) is gone{elsewhere}"
    if owner is not None and not here.owns(owner):
        other = "cluster" if owner.scheduler != here.scheduler else "head node"
        return "keep", (
            f"session of another {other} ({owner.where()}; this is {here.scheduler} on {here.head_node}): "
            "only a cleanup there can tell whether it is alive"
        )
    if owner is not None and owner.on_this_machine():
        return "keep", f"its client still runs on this machine (pid {owner.client_pid})"
    if owner is None and not has_jobs and not name.startswith("doctor-"):
        why = (
            f"it has no {OWNER_RECORD} record (made by an older version) and no job here, so it may be "
            "a session of another cluster sharing this home directory"
        )
    elif session.endpoint:
        state, seen = probe_endpoint(shell, session.endpoint, f"{root}/{name}/secret")
        if state == "gone":
            return "remove", f"its client is gone ({session.endpoint}: {seen})"
        if state == "alive":
            return "keep", f"its client is alive ({session.endpoint}: {seen})"
        why = f"cannot tell whether its client at {session.endpoint} still runs ({seen})"
    elif name.startswith("doctor-") and session.old:
        return "remove", f"left by a doctor run more than {DOCTOR_LEFTOVER_MINUTES} minutes ago"
    else:
        why = f"cannot tell whether its client still runs (no {ENDPOINT_RECORD} record in its directory)"
    if force:
        return "remove", why + "; removed because of --force"
    return "keep", why + "; --force removes it"


def probe_endpoint(shell: Shell, url: str, secret_path: str) -> tuple[str, str]:
    """Ask a client's endpoint from the head node (the nodes' side) to answer a challenge signed
    with its session's secret: ("alive" | "gone" | "unknown", what was seen). An open port is not
    enough: anything may listen on a dead client's port."""
    parts = urllib.parse.urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port or parts.scheme not in ("http", "https") or not re.fullmatch(r"[\w.:-]+", host):
        return "unknown", f"unreadable endpoint record {url!r}"
    return probe_client(shell, url, secret_path)


def _remove(
    scheduler: Scheduler, shell: Shell, root: str, name: str, job_ids: list[str], has_dir: bool
) -> None:
    """Cancel a session's jobs, wait (up to 30 s) until they left the queue, delete its directory."""
    if job_ids:
        scheduler.cancel(job_ids)
        deadline = time.monotonic() + 30
        while scheduler.poll(job_ids) and time.monotonic() < deadline:
            time.sleep(1.0)
    if has_dir:
        if not (root.startswith("/") and plain_name(name)):
            raise AssertionError(f"refusing to remove {root}/{name}")
        shell.run(f"rm -rf {shlex.quote(f'{root}/{name}')}", timeout=60)


if __name__ == "__main__":
    sys.exit(main())
