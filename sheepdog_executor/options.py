"""Every executor option, declared once: its default, its one-line documentation, how a config file
writes it and what values it takes.

``ExecutorOptions`` holds the options every executor shares; each scheduler's ``Options`` dataclass
declares its own with the same ``option()`` fields. The executors' signatures, the config file and
``SHEEPDOG_*`` variables (``config.py``), the CLI and the joblib backend take names and defaults from
here. Ground floor: imports nothing of the package but ``errors``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sheepdog_executor.errors import ConfigurationError
from sheepdog_executor.resources import check_factors, parse_count, parse_memory, parse_time

#: How workers reach the client (``callback=``).
CALLBACK_MODES = ("auto", "direct", "tunnel")
#: The most workers at once without ``max_workers=`` (``LocalExecutor``: the CPUs).
DEFAULT_MAX_WORKERS = 32
_META = "sheepdog"


@dataclass(frozen=True)
class Option:
    """How one option is written: ``kind`` is int, float, bool, str, "lines", "args", "resources"
    or "factors"."""

    kind: type | str
    #: The values a string option may take, when only a few are valid.
    choices: tuple[str, ...] = ()
    #: The scheduler whose executor alone takes the option (its ``Scheduler.name``); "" for all.
    scheduler: str = ""
    #: One line for users: what the option does.
    doc: str = ""
    #: Whether a config file or ``SHEEPDOG_*`` variable may set it (not the host: a table's name).
    configurable: bool = True
    #: Raises ConfigurationError for a value the executor refuses (None: any value of ``kind``).
    check: Callable[[Any], None] | None = None

    @property
    def scalar(self) -> bool:
        """Scalars can also be set from the environment."""
        return isinstance(self.kind, type)

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return {
            int: "an integer",
            float: "a number",
            bool: "true or false",
            str: "a string",
            "lines": "a string or an array of strings",
            "args": "an array of strings",
            "resources": 'a table of strings (h_vmem = "2G") or an array of "name=value" strings',
            "factors": "a table of numbers above 1 (mem = 2, time = 2)",
        }[self.kind]


def option(
    default: Any,
    doc: str,
    kind: type | str,
    *,
    choices: tuple[str, ...] = (),
    check: Callable[[Any], None] | None = None,
    configurable: bool = True,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that is an executor option (``factory`` for a mutable default)."""
    meta = {_META: Option(kind, choices, doc=doc, configurable=configurable, check=check)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(options: type, scheduler: str = "") -> dict[str, Option]:
    """The options an ``option()`` dataclass declares, by name, tagged with ``scheduler``."""
    found = {}
    for field in dataclasses.fields(options):
        spec = field.metadata.get(_META) or Option(str)
        found[field.name] = dataclasses.replace(spec, scheduler=scheduler)
    return found


def defaults(options: type) -> dict[str, Any]:
    """Each field's default (a factory's value made now)."""
    found = {}
    for field in dataclasses.fields(options):
        if field.default_factory is not dataclasses.MISSING:
            found[field.name] = field.default_factory()
        else:
            found[field.name] = field.default
    return found


def check_declared(options: Any) -> None:
    """Run each field's ``check`` on its value (from an options dataclass's ``__post_init__``)."""
    for name, spec in declared(type(options)).items():
        if spec.check is not None:
            spec.check(getattr(options, name))


def lines(value: Sequence[str] | str) -> list[str]:
    """The shell lines of a "lines" option (``setup``, ``command_setup``): a string is one line."""
    return [value] if isinstance(value, str) else list(value)


def _positive_workers(value: int | None) -> None:
    if value is not None and value <= 0:
        raise ConfigurationError("max_workers must be greater than 0")


def _no_negative_retries(value: int) -> None:
    if value < 0:
        raise ConfigurationError("retries must be 0 or more")


def _tolerance(value: float) -> None:
    if not value >= 10:
        raise ConfigurationError(
            f"disconnect_tolerance must be at least 10 (seconds), not {value!r}: "
            "it is how long workers wait for this client before they give up and exit"
        )


def _rate(value: float) -> None:
    if not value >= 6:
        raise ConfigurationError(
            f"commands_per_minute must be at least 6, not {value!r}: the executor polls the "
            "scheduler, submits and removes jobs with these commands"
        )


def _time(value: Any) -> None:
    if value is not None:
        parse_time(value)


def _memory(value: Any) -> None:
    if value is not None:
        parse_memory(value)


def _cpus(value: Any) -> None:
    if value is not None:
        parse_count(value, "cpus", 1)


def _gpus(value: Any) -> None:
    if value is not None:
        parse_count(value, "gpus", 0)


def _sweep_name(value: str | None) -> None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ConfigurationError(
            f"sweep={value!r} is not a usable name: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names the sweep's directory on the cluster)"
        )


@dataclass(frozen=True)
class ExecutorOptions(Mapping[str, Any]):
    """The options every executor takes, whatever its scheduler; a read-only mapping of name to value
    (what ``Session`` and ``JobOptions.from_options`` read)."""

    max_workers: int | None = option(
        None, "the most workers at once (32; LocalExecutor: the CPUs)", int, check=_positive_workers
    )
    # SSH
    host: str | None = option(
        None, "host name or ~/.ssh/config alias of the head node (None: here)", str, configurable=False
    )
    user: str | None = option(None, "the SSH user (else ~/.ssh/config's, else yours)", str)
    port: int | None = option(None, "the SSH port (else ~/.ssh/config's, else 22)", int)
    key_filename: str | None = option(None, "the SSH private key file", str)
    ssh_config: str = option("~/.ssh/config", "the OpenSSH config file read for the host", str)
    connect_timeout: float = option(15.0, "seconds to connect over SSH", float)
    command_setup: Sequence[str] | str = option((), "shell lines before each scheduler command", "lines")
    # the jobs, under any scheduler
    job_name: str = option("sheepdog", "the jobs' name", str)
    working_directory: str | None = option(None, "the tasks' working directory", str)
    setup: Sequence[str] | str = option((), "shell lines each task runs before the worker", "lines")
    setup_shell: str = option("/bin/bash -l", "the shell that runs the set-up lines", str)
    python: str = option("python3", "the Python interpreter on the nodes", str)
    # what each task needs, in the same words on every scheduler (resources.py maps them)
    time: str | int | None = option(
        None, 'wall-clock limit per task: "90" (minutes), "2:00:00", "1-12:00:00"', str, check=_time
    )
    mem: str | None = option(None, 'memory per task, e.g. "4G" or "512M"', str, check=_memory)
    cpus: int | None = option(
        None, "CPUs per task (and the threads of numerical libraries)", int, check=_cpus
    )
    gpus: int | None = option(None, "GPUs per task", int, check=_gpus)
    escalate: Mapping[str, float] | None = option(
        None,
        'run a call killed over mem= or time= again with more: {"mem": 2, "time": 2}',
        "factors",
        check=check_factors,
    )
    max_mem: str | None = option(None, "the most mem= escalate= asks for", str, check=_memory)
    max_time: str | None = option(None, "the most time= escalate= asks for", str, check=_time)
    # the executor
    retries: int = option(
        0, "how often a call whose worker was lost is run again", int, check=_no_negative_retries
    )
    batch_window: float = option(0.05, "seconds to gather calls into one array job", float)
    poll_interval: float = option(2.0, "seconds between polls of the scheduler", float)
    idle_timeout: float = option(5.0, "seconds an idle worker waits for work before it exits", float)
    heartbeat: float = option(5.0, "seconds between a worker's heartbeats", float)
    heartbeat_timeout: float = option(60.0, "seconds of silence after which a worker counts as lost", float)
    callback_address: str | None = option(None, "the address workers connect to (else detected)", str)
    callback_port: int = option(0, "the endpoint's port (0: any free one)", int)
    callback: str = option("auto", "how workers reach this client", str, choices=CALLBACK_MODES)
    tls: bool | None = option(None, "TLS on the workers' connections (None: on shared routes)", bool)
    session_root: str = option("~/.sheepdog-executor", "where session directories go on the cluster", str)
    echo_output: bool = option(False, "print the workers' output here as it comes", bool)
    status_page: bool = option(True, "serve a live status page", bool)
    progress: bool | None = option(None, "a progress bar for maps (None: on a terminal)", bool)
    environment: str | None = option(
        None, '"sync": the nodes run a copy of this environment', str, choices=("sync", "none")
    )
    environment_add: Sequence[str] | str = option((), "extra packages for the synced environment", "args")
    environment_exclude: Sequence[str] | str = option(
        (), "packages left out of the synced environment", "args"
    )
    disconnect_tolerance: float = option(
        600.0, "seconds workers wait for a client gone silent", float, check=_tolerance
    )
    commands_per_minute: float = option(
        60.0, "the most scheduler commands a minute (polls, submits, accounting)", float, check=_rate
    )
    sweep: str | None = option(
        None,
        "keep each call's result on the cluster under this name: a rerun serves the kept ones",
        str,
        check=_sweep_name,
    )

    def __post_init__(self) -> None:
        check_declared(self)

    @classmethod
    def pick(cls, options: Mapping[str, Any]) -> ExecutorOptions:
        """The shared options found in ``options`` (the others ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)
