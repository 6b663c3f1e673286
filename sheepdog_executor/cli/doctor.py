"""``sheepdog-executor doctor HOST``: checks, in the order an executor needs them, everything between
this client and the nodes, and says what to change at the first thing that is wrong."""

from __future__ import annotations

import dataclasses
import io
import re
import shlex
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any, TextIO

from sheepdog_executor.cli.common import (
    connect_head,
    detect_executor,
    executor_default,
    executors,
    make_scheduler,
    own_options,
)
from sheepdog_executor.config import (
    config_path,
    env_name,
    environment_options,
    resolve_options,
)
from sheepdog_executor.errors import (
    ConfigurationError,
    ConnectionFailed,
    SchedulerError,
    SheepdogError,
    UnknownHostKey,
    WorkerStartFailed,
)
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch, with_setup
from sheepdog_executor.scheduler import Scheduler, TaskState
from sheepdog_executor.sessiondir import make_session_dir, prepare_root
from sheepdog_executor.shell import SSHShell

if TYPE_CHECKING:
    pass

_PROBE_MAIN = (
    "import socket, sys\n"
    'sys.stdout.write("sheepdog-probe %d.%d.%d %s\\n" % (sys.version_info[0], sys.version_info[1], '
    "sys.version_info[2], socket.gethostname()))\n"
)
_PROBE_LINE = re.compile(r"^sheepdog-probe (\d+)\.(\d+)\.(\d+) (\S+)$", re.M)
_VERSION_SNIPPET = 'import sys; print("%d.%d.%d" % tuple(sys.version_info[:3]))'


class CheckFailed(SheepdogError):
    """A doctor check failed: what was seen, and what to change."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def _indent(text: str) -> str:
    return text.strip().replace("\n", "\n" + " " * 16)


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
        self.executor_class = executors()["gridengine" if scheduler == "auto" else scheduler]
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
            self.shell = connect_head(self.host, self.options)
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
            self.scheduler = make_scheduler(self.shell, self.options, self.job_options, cls)
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
            **own_options(self.options, self.executor_class),
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
        scheduler = make_scheduler(
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
