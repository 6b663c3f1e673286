"""What the commands share: the head node's shell, the executor and scheduler its options mean, and
their defaults, through the library's own code (``shell.connect``, ``sessiondir``, ``registry``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from sheepdog_executor import registry
from sheepdog_executor.config import OPTIONS, config_path, configured_scheduler, resolve_options
from sheepdog_executor.errors import ConfigurationError, ConnectionFailed, SheepdogError
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.options import ExecutorOptions, defaults, lines
from sheepdog_executor.scheduler import Scheduler
from sheepdog_executor.sessiondir import canonical_root
from sheepdog_executor.shell import Shell, SSHShell, connect

if TYPE_CHECKING:
    from sheepdog_executor.executor import ClusterExecutor


class CheckFailed(SheepdogError):
    """A doctor check failed: what was seen, and what to change."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def connect_head(host: str, options: Mapping[str, Any]) -> SSHShell:
    """The SSH shell to ``host`` with the executor's SSH options (``shell.connect``)."""
    shell = connect(host, options)
    assert isinstance(shell, SSHShell)  # a host was given
    return shell


def run_on_head(host: str, out: TextIO, command: Callable[[SSHShell, dict[str, Any]], int]) -> int:
    """``command(shell, options)`` on ``host``'s head node, with the options an executor for ``host``
    would take (config file, ``SHEEPDOG_*``), and its exit status; an error is printed to ``out`` as
    ``error: ...`` and gives 1. The shell is closed after."""
    try:
        options = resolve_options(host, {})
        shell = connect_head(host, options)
    except (ConfigurationError, ConnectionFailed) as exc:
        print(f"error: {exc}", file=out)
        return 1
    try:
        return command(shell, options)
    except SheepdogError as exc:
        print(f"error: {exc}", file=out)
        return 1
    finally:
        shell.close()


def executors() -> dict[str, type[ClusterExecutor]]:
    """The executors the commands know, by the name ``--scheduler`` takes (the registry's keys)."""
    from sheepdog_executor.executor import executor_class

    return {key: executor_class(key) for key in registry.entries()}


def detect_executor(
    shell: Shell, options: Mapping[str, Any], choice: str, host: str = ""
) -> tuple[type[ClusterExecutor], str]:
    """The executor for ``--scheduler`` ``choice``; with "auto", the one the config file names for
    ``host`` (``configured_scheduler``), else the one whose submit command the head node has (Grid
    Engine when it has both). Returns it and a note on how it was chosen."""
    known = executors()
    if choice != "auto":
        return known[choice], "chosen by --scheduler"
    configured = configured_scheduler(host) if host else None
    if configured is not None:
        return known[configured[0]], f"chosen by {configured[1]}"
    probe = "; ".join(
        f"command -v {cls.scheduler_class.commands[0]} >/dev/null && echo {name}"
        for name, cls in known.items()
        if cls.scheduler_class.commands
    )
    found = shell.run("\n".join([*lines(options.get("command_setup", ())), probe]), timeout=60).stdout.split()
    if len(found) > 1:
        return known[found[0]], (
            f"{' and '.join(found)} found, checking {found[0]} (--scheduler, or scheduler = "
            f'"..." under [hosts."{host}"] in {config_path()}, chooses)'
        )
    return known[found[0] if found else "gridengine"], ""


def own_options(options: Mapping[str, Any], cls: type[ClusterExecutor]) -> dict[str, Any]:
    """``options`` without those of other schedulers' executors (a shared [default] table has them)."""
    name, table = cls.scheduler_class.name, dict(OPTIONS)
    return {k: v for k, v in options.items() if k not in table or table[k].scheduler in ("", name)}


def make_scheduler(
    shell: Shell, options: Mapping[str, Any], job_options: JobOptions, cls: type[Scheduler]
) -> Scheduler:
    """The scheduler an executor with these options would use (its own options checked)."""
    return cls(shell, job_options, options.get("command_setup", ()), cls.site_options(options))


def executor_default(option: str) -> Any:
    """An executor's own default for an option, from its declaration (``options.py``)."""
    return defaults(ExecutorOptions)[option]


def session_root(shell: Shell, options: Mapping[str, Any]) -> str:
    """The session root on the head node, canonical, as the executor names its session directories."""
    return canonical_root(shell, str(options.get("session_root", executor_default("session_root"))))
