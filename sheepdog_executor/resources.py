"""One vocabulary for what each task needs, on every scheduler: ``time=``, ``mem=``, ``cpus=``,
``gpus=``, in the forms users write (``"2:00:00"``, ``"90"`` minutes, ``"4G"``, ``"512M"``).

Parsed once here into ``Resources`` (seconds, bytes, counts); each scheduler module writes them in
its own words (Grid Engine ``h_rt``/``h_vmem``/``-pe``, Slurm ``--time``/``--mem``/...). Ground
floor: imports nothing of the package but ``errors``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sheepdog_executor.errors import ConfigurationError

#: The vocabulary's option names, in the order they are shown.
NAMES = ("cpus", "mem", "time", "gpus")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT])(?:I?B)?", re.I)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_CLOCK = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_SUFFIXED = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d)", re.I)
_SUFFIX_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_TIME_FORMS = 'minutes ("90"), H:MM:SS ("2:00:00"), D-HH:MM:SS ("1-12:00:00") or "90m", "2h", "1d"'


def parse_time(value: Any, name: str = "time") -> int:
    """Seconds in a time limit as users write it: minutes (``90``, ``"90"``), Slurm's clock forms
    (``"MM:SS"``, ``"H:MM:SS"``, ``"D-H"``, ``"D-H:MM"``, ``"D-H:MM:SS"``), ``"90m"``/``"2h"``/``"1d"``,
    or a ``timedelta``; ConfigurationError naming the forms otherwise."""
    if isinstance(value, datetime.timedelta):
        seconds = math.ceil(value.total_seconds())
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value * 60
    elif isinstance(value, str) and (match := _CLOCK.fullmatch(value.strip())):
        days, first, second, third = match.groups()
        if days is not None:  # D-H, D-H:MM, D-H:MM:SS
            seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
        elif third is not None:  # H:MM:SS
            seconds = int(first) * 3600 + int(second) * 60 + int(third)
        elif second is not None:  # MM:SS, as Slurm reads it
            seconds = int(first) * 60 + int(second)
        else:  # minutes, as Slurm reads a plain number
            seconds = int(first) * 60
    elif isinstance(value, str) and (match := _SUFFIXED.fullmatch(value.strip())):
        seconds = math.ceil(float(match.group(1)) * _SUFFIX_SECONDS[match.group(2).lower()])
    else:
        raise ConfigurationError(f"{name}={value!r} is not a time limit: write {_TIME_FORMS}")
    if seconds <= 0:
        raise ConfigurationError(f"{name}={value!r} must be longer than 0: write {_TIME_FORMS}")
    return seconds


def parse_memory(value: Any, name: str = "mem") -> int:
    """Bytes in a memory size as users write it: ``"4G"``, ``"512M"``, ``"1.5GB"``, ``"100MiB"``
    (K, M, G, T: powers of 1024, in either case); ConfigurationError naming the fix otherwise (a
    bare number is refused: Grid Engine reads it as bytes, Slurm as megabytes)."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    match = _MEMORY.fullmatch(text) if text is not None else None
    if match is None:
        hint = f' (a unit is needed: "{text}M" or "{text}G"?)' if text is not None and text.isdigit() else ""
        raise ConfigurationError(
            f'{name}={value!r} is not a memory size{hint}: write a number and a unit, e.g. "4G" or "512M"'
        )
    size = math.ceil(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ConfigurationError(f'{name}={value!r} must be more than 0, e.g. "4G" or "512M"')
    return size


def parse_count(value: Any, name: str, least: int) -> int:
    """A whole number of CPUs or GPUs, at least ``least``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigurationError(f"{name}={value!r} must be a whole number, {least} or more (e.g. {name}=4)")
    return value


#: What escalation raises (``escalate=``): the memory and the time limit.
KINDS = ("mem", "time")


def check_factors(value: Any) -> None:
    """ConfigurationError unless ``value`` is None or ``{"mem": 2, "time": 1.5}``-like."""
    if value is None:
        return
    if not isinstance(value, Mapping) or not value:
        raise ConfigurationError(
            f'escalate={value!r} must be a table of factors, e.g. {{"mem": 2, "time": 2}}'
        )
    for name, factor in value.items():
        if name not in KINDS:
            raise ConfigurationError(
                f"escalate={{{name!r}: ...}}: only {' and '.join(KINDS)} are escalated, e.g. "
                '{"mem": 2, "time": 2}'
            )
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
            raise ConfigurationError(
                f"escalate={{{name!r}: {factor!r}}}: a factor must be a number above 1, e.g. 2"
            )


def format_memory(size: int) -> str:
    """``4G``, ``1536M``: a size in the largest unit that writes it whole (megabytes at least,
    rounded up), as both Grid Engine and Slurm read it."""
    if size % _UNITS["T"] == 0:
        return f"{size // _UNITS['T']}T"
    if size % _UNITS["G"] == 0:
        return f"{size // _UNITS['G']}G"
    return f"{math.ceil(size / _UNITS['M'])}M"


def format_time(seconds: int) -> str:
    """``H:MM:SS`` (hours past 24 as they are), as both Grid Engine and Slurm read it."""
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass(frozen=True)
class Resources:
    """What each task asks for, whatever the scheduler; None: the site's default. Hashable: a
    resource set is known by its ``Resources``."""

    #: The task's wall-clock limit, in seconds.
    time: int | None = None
    #: The task's memory, in bytes (all of it, whatever its CPUs).
    mem: int | None = None
    cpus: int | None = None
    gpus: int | None = None

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> Resources:
        """The vocabulary's values in ``values`` (other names ignored; None: not asked)."""
        found: dict[str, int] = {}
        if values.get("time") is not None:
            found["time"] = parse_time(values["time"])
        if values.get("mem") is not None:
            found["mem"] = parse_memory(values["mem"])
        if values.get("cpus") is not None:
            found["cpus"] = parse_count(values["cpus"], "cpus", 1)
        if values.get("gpus") is not None:
            found["gpus"] = parse_count(values["gpus"], "gpus", 0)
        return cls(**{k: v for k, v in found.items() if v})  # gpus=0: none asked

    def updated(self, values: Mapping[str, Any]) -> Resources:
        """These resources with some of them given anew (as users write them; None: the site's)."""
        unknown = set(values) - set(NAMES)
        if unknown:
            raise ConfigurationError(
                f"{', '.join(sorted(unknown))}: not a resource; the resources are {', '.join(NAMES)} "
                "(a scheduler's own options are set on the executor)"
            )
        fresh = Resources.parse(values)
        return dataclasses.replace(self, **{name: getattr(fresh, name) for name in values})

    def words(self) -> dict[str, str]:
        """Each resource asked, as users read it: ``{"mem": "4G", "time": "2:00:00"}``."""
        shown = {
            "cpus": str(self.cpus) if self.cpus else "",
            "mem": format_memory(self.mem) if self.mem else "",
            "time": format_time(self.time) if self.time else "",
            "gpus": str(self.gpus) if self.gpus else "",
        }
        return {name: value for name, value in shown.items() if value}

    def label(self) -> str:
        """``cpus=2,mem=4G`` ("" for the site's defaults): the resource set's name, in the task's
        environment (``SHEEPDOG_RESOURCES``) and on the status page."""
        return ",".join(f"{name}={value}" for name, value in self.words().items())
