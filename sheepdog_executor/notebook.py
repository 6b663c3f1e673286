"""How an executor shows itself: a one-line ``repr`` and, in Jupyter, an HTML card (as dask's ``Client``).

Both are drawn from one ``Summary``: the scheduler, the head node, the workers, the jobs, the calls
(done, running, queued, failed, cancelled) and the status page's link. Everything shown is escaped.
The link carries the page's token, so it is in the HTML card only (a notebook's output, to click),
never in the ``repr`` (which ends up in logs and tracebacks).
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sheepdog_executor.executor import ClusterExecutor

#: Job ids listed by name; past this many, the first and last ones and a count.
JOBS_LISTED = 6
CALL_STATES = ("done", "running", "queued", "failed", "cancelled")
_COLOURS = {"done": "#2da160", "running": "#3b7ddd", "failed": "#d1453b", "cancelled": "#a0a7b0"}


@dataclass
class Summary:
    """What the card and the repr show of one executor, taken at one moment."""

    kind: str
    scheduler: str
    host: str
    state: str
    max_workers: int
    workers: Counter[str] = field(default_factory=Counter)  # live workers per host
    live_jobs: list[str] = field(default_factory=list)
    submitted_jobs: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)  # CALL_STATES -> count, over all batches
    status_url: str | None = None
    session_dir: str = ""

    @classmethod
    def of(cls, executor: ClusterExecutor) -> Summary:
        session = executor._session
        status = executor.status()
        calls = dict.fromkeys(CALL_STATES, 0)
        for batch in status["batches"]:
            for state in CALL_STATES:
                calls[state] += batch[state]
        if status["broken"]:
            state = f"broken: {status['broken']}"
        elif session._closed:
            state = "shut down"
        elif executor._shutdown:
            state = "shutting down"
        else:
            state = "open"
        return cls(
            kind=type(executor).__name__,
            scheduler=session.scheduler.name,
            host=session.shell.description,
            state=state,
            max_workers=executor._max_workers,
            workers=Counter(worker["host"] for worker in status["workers"]),
            live_jobs=sorted(session.jobs.jobs),  # one C-level copy of the keys: no lock needed
            submitted_jobs=list(status["jobs"]),
            calls=calls,
            status_url=executor.status_url,
            session_dir=executor.session_dir,
        )

    def workers_text(self) -> str:
        hosts = ", ".join(f"{host}: {count}" for host, count in sorted(self.workers.items()))
        return f"{sum(self.workers.values())} of {self.max_workers}" + (f" ({hosts})" if hosts else "")

    def jobs_text(self, ids: bool = True) -> str:
        live = self.live_jobs
        listed = ", ".join(live)
        if len(live) > JOBS_LISTED:
            listed = ", ".join(live[: JOBS_LISTED - 1]) + f", ... {live[-1]}"
        shown = f" ({listed})" if ids and listed else ""
        return f"{len(live)} live{shown} of {len(self.submitted_jobs)} submitted"

    def calls_text(self) -> str:
        """Done, running and queued always; failed and cancelled when there are any."""
        return ", ".join(
            f"{self.calls[state]} {state}"
            for state in CALL_STATES
            if self.calls[state] or state in ("done", "running", "queued")
        )


def text(executor: ClusterExecutor) -> str:
    """``<GridEngineExecutor: Grid Engine on fear (...), open; workers 3 of 8 (node1: 3), ...>``."""
    if not hasattr(executor, "_session"):  # its __init__ failed
        return f"<{type(executor).__name__} (not started)>"
    s = Summary.of(executor)
    return (
        f"<{s.kind}: {s.scheduler} on {s.host}, {s.state}; workers {s.workers_text()}, "
        f"jobs {s.jobs_text(ids=False)}, calls {s.calls_text()}>"
    )


def card(executor: ClusterExecutor) -> str:
    """The HTML card: a title, a bar of the calls, and a table of the rest (inline styles only:
    notebooks keep no page-wide style sheet for an output)."""
    if not hasattr(executor, "_session"):
        return html.escape(text(executor))
    s = Summary.of(executor)
    e = html.escape
    total = sum(s.calls.values())
    segments = "".join(
        f'<span class="{state}" title="{s.calls[state]} {state}" style="display:inline-block;height:100%;'
        f'width:{100 * s.calls[state] / total:.2f}%;background:{colour}"></span>'
        for state, colour in _COLOURS.items()
        if total and s.calls[state]
    )
    link = (
        f'<a href="{e(s.status_url)}" target="_blank" rel="noopener noreferrer">{e(s.status_url)}</a>'
        if s.status_url
        else "off (status_page=False)"
    )
    rows = [
        ("Scheduler", e(s.scheduler)),
        ("Host", e(s.host)),
        ("State", e(s.state)),
        ("Workers", e(s.workers_text())),
        ("Jobs", e(s.jobs_text())),
        ("Calls", e(s.calls_text())),
        ("Status page", link),
        ("Session", f"<code>{e(s.session_dir)}</code>"),
    ]
    cell = "padding:2px 12px 2px 0;text-align:left;vertical-align:top;border:none"
    head = f"{cell};color:#656d76;font-weight:600"
    table = "".join(
        f'<tr><th style="{head}">{name}</th><td style="{cell}">{value}</td></tr>' for name, value in rows
    )
    return (
        '<div class="sheepdog-executor" style="border:1px solid #d8dee4;border-radius:8px;padding:10px 14px;'
        'max-width:760px;font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:13px">'
        f'<div style="font-weight:650;font-size:15px">{e(s.kind)}</div>'
        f'<div class="calls-bar" style="display:flex;height:8px;border-radius:4px;overflow:hidden;'
        f'background:#e9ecef;margin:8px 0">{segments}</div>'
        f'<table style="border-collapse:collapse;margin:0">{table}</table></div>'
    )
