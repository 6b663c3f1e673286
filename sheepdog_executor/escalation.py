"""Escalation: a call killed over its memory or time limit runs again with more (opt-in:
``escalate={"mem": 2, "time": 2}``), up to a ceiling (``max_mem=``, ``max_time=``; without one,
three steps), in a resource set of its own (``resourcesets.py``); the final error says what was tried.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sheepdog_executor.resources import (
    Resources,
    check_factors,
    format_memory,
    format_time,
    parse_memory,
    parse_time,
)

if TYPE_CHECKING:
    from sheepdog_executor.calls import CallBook, WorkItem
    from sheepdog_executor.sitelimits import SiteLimits

log = logging.getLogger("sheepdog_executor")

#: Without a ceiling, a call is run again with more this many times at most.
DEFAULT_STEPS = 3
_WHAT = {"mem": "its memory", "time": "its time limit"}


@dataclass(frozen=True)
class Escalation:
    """The rule: a factor per limit, and the most each may reach."""

    factors: Mapping[str, float]
    #: The ceilings (None: ``DEFAULT_STEPS`` steps above what the call first asked).
    max_mem: int | None = None
    max_time: int | None = None

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Escalation | None:
        """The rule the options ask for (``escalate``, ``max_mem``, ``max_time``); None when off."""
        factors = options.get("escalate")
        if not factors:
            return None
        check_factors(factors)
        max_mem = options.get("max_mem")
        max_time = options.get("max_time")
        return cls(
            dict(factors),
            parse_memory(max_mem, "max_mem") if max_mem is not None else None,
            parse_time(max_time, "max_time") if max_time is not None else None,
        )

    def next(
        self, needs: Resources, kind: str, first: Resources, site: SiteLimits | None = None
    ) -> Resources | None:
        """``needs`` with ``kind`` raised by its factor, no higher than the ceiling nor than what
        the ``site`` lets a task ask for; None when it cannot be raised (not escalated, not asked,
        or at the ceiling already). ``first``: what the call asked at first (the default ceiling
        counts from it)."""
        factor = self.factors.get(kind)
        now, start = getattr(needs, kind, None), getattr(first, kind, None)
        if factor is None or not now or not start:
            return None
        ceiling = self.max_mem if kind == "mem" else self.max_time
        if ceiling is None:
            ceiling = math.ceil(start * factor**DEFAULT_STEPS)
        most = site.most(kind, needs.cpus) if site is not None else None
        if most is not None:  # more would never start: the scheduler refuses it or holds it forever
            ceiling = min(ceiling, most)
        more = math.ceil(now * factor)
        if more >= 0.9 * ceiling:  # no last step of a few percent: 500M, then 1G, not 1000M, then 1G
            more = ceiling
        if more <= now:
            return None
        return dataclasses.replace(needs, **{kind: more})


def _bound(site: SiteLimits | None, kind: str, needs: Resources) -> str:
    """ "partition short allows at most time=0:01:00" when the site's limit is what stops a call
    from asking for more of ``kind``; "" otherwise."""
    most = site.most(kind, needs.cpus) if site is not None and kind in _WHAT else None
    asked = getattr(needs, kind, None) if kind in _WHAT else None
    if most is None or site is None or not asked or asked < most * 0.9:
        return ""
    shown = format_memory(most) if kind == "mem" else format_time(most)
    return f"{site.source or 'the site'} allows at most {kind}={shown}"


def tried(history: tuple[Resources, ...], kind: str, ended: str = "killed over") -> str:
    """``mem=4G, then 8G, then 16G: killed over its memory each time`` (``ended``: "out of" for
    a call that raised MemoryError)."""
    shown = format_memory if kind == "mem" else format_time
    values = [shown(getattr(needs, kind)) for needs in history if getattr(needs, kind)]
    each = " each time" if len(values) > 1 else ""
    return f"{kind}={', then '.join(values)}: {ended} {_WHAT[kind]}{each}"


class Escalator:
    """Moves calls killed over a limit to a resource set with more (``Escalation.next``), opening
    that set's job manager first; what cannot go higher is left to fail."""

    def __init__(
        self,
        rule: Escalation,
        calls: CallBook,
        open_set: Callable[[Resources], object],
        on_work: Callable[[], None],
        site: Callable[[], SiteLimits | None] = lambda: None,
    ) -> None:
        """``site``: the site's limits once known (``Scheduler.site_limits``), None before."""
        self.rule, self._calls, self._open, self._on_work = rule, calls, open_set, on_work
        self._site = site

    def __call__(self, items: list[WorkItem], kind: str) -> list[WorkItem]:
        """Run these calls again with more of ``kind`` ("mem", "time"); return those that cannot
        (at the ceiling, not escalated, or the executor is closing)."""
        left: list[WorkItem] = []
        moves: dict[Resources, list[WorkItem]] = {}
        site = self._site()
        for item in items:
            now = (item.queue or self._calls.default).needs
            first = item.history[0] if item.history else now
            more = self.rule.next(now, kind, first, site) if kind else None
            if more is None:
                item.bound = _bound(site, kind, now)
                left.append(item)
            else:
                moves.setdefault(more, []).append(item)
        for more, group in moves.items():
            try:
                self._open(more)  # its job manager, which submits arrays asking for ``more``
            except RuntimeError:  # shut down meanwhile
                left.extend(group)
                continue
            for item in group:
                now = (item.queue or self._calls.default).needs
                item.history += (now,)
                log.warning(
                    "call %d went over %s (%s); running it again with %s",
                    item.id,
                    _WHAT[kind],
                    now.label(),
                    more.label(),
                )
            self._calls.move(group, more)
        if moves:
            self._on_work()
        return left
