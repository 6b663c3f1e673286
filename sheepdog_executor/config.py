"""Defaults for executor options from the user's config file and ``SHEEPDOG_<OPTION>`` variables.

The file (``~/.config/sheepdog-executor/config.toml``, or ``$SHEEPDOG_EXECUTOR_CONFIG``) has a
``[default]`` table and one table per host alias, ``[hosts."fear"]``. An option takes the first value
found in: the explicit argument, the environment, the host's table, ``[default]``; options found
nowhere are left out, so the executor's own defaults apply. The host itself, when not given, is
``$SHEEPDOG_HOST`` or ``host`` in ``[default]`` (the user's usual cluster); a host's table may say
which of its schedulers the commands check (``scheduler = "slurm"``).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sheepdog_executor import registry
from sheepdog_executor.errors import ConfigurationError, OptionOfAnotherScheduler
from sheepdog_executor.options import ExecutorOptions, Option, declared

CONFIG_ENV = "SHEEPDOG_EXECUTOR_CONFIG"
#: The usual cluster's host (or ssh alias) when an executor is given none.
HOST_ENV = "SHEEPDOG_HOST"
#: ``SHEEPDOG_*`` variables that are not options: the config file's, the host's, and those the
#: worker's task sets (a worker's own client, e.g. a nested executor, sees them).
NOT_OPTIONS = frozenset(
    {CONFIG_ENV, HOST_ENV, "SHEEPDOG_JOB_ID", "SHEEPDOG_TASK_ID", "SHEEPDOG_CPUS", "SHEEPDOG_RESOURCE_SET"}
)
DEFAULT_CONFIG_PATH = "~/.config/sheepdog-executor/config.toml"
ENV_PREFIX = "SHEEPDOG_"

F = TypeVar("F", bound=Callable[..., Any])

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class OptionTable(Mapping[str, Option]):
    """Every option a file or the environment may set (not callables, not the host), by name: the
    shared ones (``ExecutorOptions``) and each registered scheduler's own (its ``Options``), read
    from their declarations on each use (a scheduler registered later is in it)."""

    def __init__(self) -> None:
        self._made: tuple[Any, dict[str, Option]] = (None, {})

    def _table(self) -> dict[str, Option]:
        schedulers = registry.scheduler_classes()
        key = tuple((name, id(cls), id(cls.Options)) for name, cls in schedulers.items())
        made_for, table = self._made
        if made_for == key:
            return table
        table = {k: v for k, v in declared(ExecutorOptions).items() if v.configurable}
        for scheduler in schedulers.values():
            for name, spec in declared(scheduler.Options, scheduler.name).items():
                table.setdefault(name, spec)
        self._made = (key, table)
        return table

    def __getitem__(self, name: str) -> Option:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


#: Every option of the executors that a file or the environment may set (not callables, not host).
OPTIONS: Mapping[str, Option] = OptionTable()


def scheduler_keys() -> dict[str, str]:
    """``--scheduler``'s key of each registered scheduler, by the scheduler's name."""
    return {cls.name: key for key, cls in registry.scheduler_classes().items()}


def env_name(option: str) -> str:
    """The environment variable of an option: ``max_workers`` -> ``SHEEPDOG_MAX_WORKERS``."""
    return ENV_PREFIX + option.upper()


def config_path() -> Path:
    """Where the config file is (it need not exist)."""
    return Path(os.path.expanduser(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH))


def resolve_options(host: str | None, explicit: Mapping[str, Any]) -> dict[str, Any]:
    """The options for an executor on ``host``: ``explicit`` first, then the environment, then the
    host's table, then ``[default]``. Without ``host``, the usual one (``default_host``) is used and
    returned as ``host`` (a given host is not returned). Raises ConfigurationError for unknown keys
    or wrong types."""
    defaults, per_host = load_config()
    resolved: dict[str, Any] = {k: v for k, v in defaults.items() if k != "host"}
    if host is None:
        host = default_host(defaults)
        if host is not None:
            resolved["host"] = host
    if host is not None:
        resolved.update({k: v for k, v in per_host.get(host, {}).items() if k != "scheduler"})
    resolved.update(environment_options())
    resolved.update({k: v for k, v in explicit.items() if not (k == "host" and v is None)})
    return resolved


def default_host(defaults: Mapping[str, Any] | None = None) -> str | None:
    """The user's usual cluster: ``$SHEEPDOG_HOST``, else ``host`` in the file's ``[default]``."""
    from_env = os.environ.get(HOST_ENV, "").strip()
    if from_env:
        return from_env
    host = (load_config()[0] if defaults is None else defaults).get("host")
    return str(host) if host else None


def configured_scheduler(host: str) -> tuple[str, str] | None:
    """The scheduler the config file names for ``host`` (``--scheduler``'s names) and where it says so:
    the host table's ``scheduler`` key, else the one scheduler whose own options the table sets."""
    table = load_config()[1].get(host, {})
    where = f'[hosts."{host}"] in {config_path()}'
    if "scheduler" in table:
        return table["scheduler"], f"scheduler = {table['scheduler']!r} in {where}"
    options = dict(OPTIONS)
    names = {options[k].scheduler for k in table if k in options and options[k].scheduler}
    if len(names) == 1:
        name = names.pop()
        return scheduler_keys()[name], f"{name}'s options in {where}"
    return None


def load_config(path: Path | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The validated ``[default]`` table and the ``[hosts."..."]`` tables of the config file.

    A missing file is an empty config, unless its path was given with $SHEEPDOG_EXECUTOR_CONFIG.
    """
    explicit_path = path is not None or bool(os.environ.get(CONFIG_ENV))
    path = path or config_path()
    if not path.exists():
        if explicit_path:
            raise ConfigurationError(f"config file {path} (from ${CONFIG_ENV}) does not exist")
        return {}, {}
    data = _read_toml(path)
    for key in data:
        if key not in ("default", "hosts"):
            raise ConfigurationError(
                f"{path}: unknown table or key {key!r} at the top level; only [default] and "
                '[hosts."ALIAS"] tables are read (options go inside them)'
            )
    defaults = _table(path, "[default]", data.get("default", {}), extra={"host": Option(str)})
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigurationError(f'{path}: "hosts" must be tables, written [hosts."ALIAS"]')
    scheduler = {"scheduler": Option(str, tuple(registry.entries()))}
    per_host = {
        name: _table(path, f'[hosts."{name}"]', table, extra=scheduler) for name, table in hosts.items()
    }
    return defaults, per_host


def environment_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Scalar options set as ``SHEEPDOG_<OPTION>``; empty variables count as unset, and other
    ``SHEEPDOG_*`` variables (``SHEEPDOG_EXECUTOR_CONFIG``, the workers' own) are not options."""
    environ = os.environ if environ is None else environ
    _warn_unknown(environ)
    found: dict[str, Any] = {}
    for name, option in OPTIONS.items():
        raw = environ.get(env_name(name), "").strip()
        if not raw or env_name(name) in NOT_OPTIONS:  # SHEEPDOG_CPUS: the task's, not cpus=
            continue
        if not option.scalar:
            raise ConfigurationError(
                f"${env_name(name)} is set, but {name} is {option.describe()} and is only read from "
                f"the config file ({config_path()}) or given as an argument"
            )
        found[name] = _parse_env(name, option, raw)
    return found


def uses_config(init: F) -> F:
    """Decorate an executor's ``__init__``: options not passed explicitly come from
    ``resolve_options`` (the signature's defaults hide what was passed, so this looks at the call)."""
    signature = inspect.signature(init)
    params = list(signature.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in params):
        raise TypeError("uses_config needs an __init__ whose parameters can all be given by name")
    self_name = params[0].name
    var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        self = arguments.pop(self_name)
        if var_keyword is not None:
            arguments.update(arguments.pop(var_keyword, {}))
        scheduler_class = getattr(type(self), "scheduler_class", None)
        scheduler = getattr(scheduler_class, "name", "")
        _check_scheduler_options(type(self), scheduler, arguments)
        resolved = resolve_options(arguments.get("host"), arguments)
        # a [default] table may hold options of several schedulers: each executor takes its own
        options = dict(OPTIONS)
        for name in [n for n in resolved if n not in arguments and n in options]:
            if scheduler and options[name].scheduler not in ("", scheduler):
                del resolved[name]
        if resolved.get("host") is None and scheduler_class is not None:
            _check_local_scheduler(scheduler_class, resolved)
        return init(self, **resolved)

    return wrapper  # type: ignore[return-value]


def _check_scheduler_options(cls: type, scheduler: str, arguments: Mapping[str, Any]) -> None:
    """Refuse an option of another scheduler's executor, naming that executor and this one's own
    options (from the registry's rows), instead of Python's "unexpected keyword argument"."""
    options = dict(OPTIONS)
    for name in arguments:
        option = options.get(name)
        if option is None or not scheduler or option.scheduler in ("", scheduler):
            continue
        rows = registry.entries()
        owners = [rows[key].executor for key in rows if rows[key].load().name == option.scheduler]
        own = ", ".join(f"{n}=" for n, o in options.items() if o.scheduler == scheduler)
        raise OptionOfAnotherScheduler(
            f"{name}= is an option of {owners[0] if owners else 'another executor'} ({option.scheduler}), "
            f"not of {cls.__name__}; on {scheduler} the jobs are shaped by {own}"
        )


def _check_local_scheduler(scheduler_class: Any, resolved: Mapping[str, Any]) -> None:
    """Without a host the scheduler's commands run on this machine: say so at once when it has none
    (rather than the shell's "qsub: not found"), unless set-up lines may provide them."""
    commands = getattr(scheduler_class, "commands", ())
    if not commands or resolved.get("command_setup") or shutil.which(commands[0]):
        return
    raise ConfigurationError(
        f"no host given and no {commands[0]} here: pass host= (a host name or ~/.ssh/config alias of "
        f"the cluster's head node), or name your usual cluster once with ${HOST_ENV} or host = "
        f'"..." in the [default] table of {config_path()}'
    )


_warned: set[str] = set()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    """Warn (once each) of ``SHEEPDOG_*`` variables that are no option but look like one."""
    known = {env_name(name) for name in OPTIONS} | NOT_OPTIONS
    names = {variable[len(ENV_PREFIX) :].lower(): variable for variable in known}
    for variable in environ:
        if not variable.startswith(ENV_PREFIX) or variable in known or variable in _warned:
            continue
        close = difflib.get_close_matches(variable[len(ENV_PREFIX) :].lower(), sorted(names), n=1, cutoff=0.8)
        if close:
            _warned.add(variable)
            warnings.warn(
                f"${variable} is not a sheepdog-executor option and is ignored; did you mean "
                f"${names[close[0]]}? (the options: {', '.join(sorted(OPTIONS))}, and ${HOST_ENV})",
                UserWarning,
                stacklevel=3,
            )


# -- reading and checking ----------------------------------------------------------------------
def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigurationError(
                f"reading {path} needs Python 3.11+ or the 'tomli' package (pip install tomli)"
            )
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}")
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}")


def _table(path: Path, where: str, table: Any, extra: Mapping[str, Option] | None = None) -> dict[str, Any]:
    """The table's options checked; ``extra`` are the keys this table takes besides the options."""
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: {where} must be a table of options")
    checked: dict[str, Any] = {}
    for key, value in table.items():
        option = OPTIONS.get(key) or (extra or {}).get(key)
        if option is None:
            raise ConfigurationError(f"{path}: unknown option {key!r} in {where}{_suggest(key)}")
        checked[key] = _check_value(key, option, value, f"{path}: {key} in {where}")
    return checked


def _suggest(key: str) -> str:
    if key == "host":
        return '; the host is the table\'s name, [hosts."ALIAS"] (a usual host goes in [default])'
    close = difflib.get_close_matches(key, OPTIONS, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; known options: " + ", ".join(sorted(OPTIONS))


def _check_value(key: str, option: Option, value: Any, where: str) -> Any:
    def wrong() -> ConfigurationError:
        return ConfigurationError(f"{where} must be {option.describe()}, not {value!r}")

    kind = option.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong()
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        value = float(value)
    elif kind is str:
        if not isinstance(value, str) or (option.choices and value not in option.choices):
            raise wrong()
    elif kind == "lines":
        if not isinstance(value, str) and not _strings(value):
            raise wrong()
    elif kind == "args":
        if not _strings(value):
            raise wrong()
    elif kind == "resources":
        if isinstance(value, dict):
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value.values()):
                raise wrong()
            value = {name: str(v) for name, v in value.items()}
        elif not _strings(value):
            raise wrong()
    elif kind == "factors":
        if not isinstance(value, dict):
            raise wrong()
    return value


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _parse_env(name: str, option: Option, raw: str) -> Any:
    variable = env_name(name)
    kind = option.kind
    try:
        if kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if option.choices and raw not in option.choices:
            raise ValueError(raw)
    except ValueError:
        raise ConfigurationError(f"${variable}={raw!r} must be {option.describe()}")
    return raw
