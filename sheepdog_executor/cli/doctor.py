"""``sheepdog-executor doctor HOST``: checks, in the order an executor needs them, everything between
this client and the nodes, and says what to change at the first thing that is wrong."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from sheepdog_executor.cli.common import (
    CheckFailed,
    connect_head,
    detect_executor,
    executors,
    make_scheduler,
    own_options,
)
from sheepdog_executor.cli.probe import PythonProbe
from sheepdog_executor.cli.testcall import callback_route, run_test_call
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
    UnknownHostKey,
)
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.scheduler import Scheduler
from sheepdog_executor.shell import SSHShell

__all__ = ["CheckFailed", "Doctor"]


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
        probe = PythonProbe(self.shell, self.options, self.job_options, self.executor_class, self.timeout)
        head = probe.head_python()
        version, node, job_id, stderr = probe.run_job()
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
        assert self.shell is not None and self.scheduler is not None
        # decided here once (auto probes from the head node), so that it can be reported
        route, how, fix = callback_route(self.shell, self.options)
        options = {
            **own_options(self.options, self.executor_class),
            "max_workers": 1,
            "callback": route.mode,
        }
        return run_test_call(self.executor_class, self.host, options, self.timeout, self.scheduler, how, fix)
