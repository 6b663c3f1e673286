"""``sheepdog-executor cleanup HOST``: removes the jobs and session directories of clients that died
without shutting down (SIGKILL, a lost laptop, a crashed kernel): only the user's own jobs, only those
that run our worker from a session directory, and only when the session's client is known to be gone,
as seen from where cleanup stands: the home directory may be shared with other clusters and head
nodes, whose sessions it lists as kept."""

from __future__ import annotations

import re
import shlex
import sys
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from sheepdog_executor.cli.common import detect_executor, make_scheduler, run_on_head, session_root
from sheepdog_executor.cli.sweeps import remove_sweep
from sheepdog_executor.environment import ENVIRONMENT_RECORD, HeadNode
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.liveness import probe_client
from sheepdog_executor.options import lines
from sheepdog_executor.scheduler import Scheduler, SessionJob
from sheepdog_executor.scheduler.base import plain_name
from sheepdog_executor.sessiondir import OWNER_RECORD, Owner
from sheepdog_executor.shell import Shell

#: The file in a session directory that holds the client's endpoint URL (see ``cleanup``).
ENDPOINT_RECORD = "endpoint"
#: A doctor probe directory this old (minutes) without jobs is left over from a doctor that died.
DOCTOR_LEFTOVER_MINUTES = 10


@dataclass
class SessionDir:
    """A directory under the session root that holds a session's secret or worker bundle."""

    name: str
    endpoint: str | None
    old: bool
    #: Its owner record; None when it has none (made by an older version) or it is unreadable.
    owner: Owner | None = None
    #: The KEY of the synced environment its workers run, if it recorded one.
    environment: str | None = None


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
    sweep: str | None = None,
) -> int:
    """Remove what clients that died left on ``host``; return the exit status."""
    out = out or sys.stdout
    return run_on_head(
        host,
        out,
        lambda shell, options: _cleanup_on(
            shell, options, host, choice, dry_run=dry_run, force=force, envs=envs, sweep=sweep, out=out
        ),
    )


def _cleanup_on(
    shell: Shell,
    options: Mapping[str, Any],
    host: str,
    choice: str,
    *,
    dry_run: bool,
    force: bool,
    envs: bool,
    sweep: str | None,
    out: TextIO,
) -> int:
    """``cleanup`` on the head node that ``shell`` reaches, with ``host``'s ``options``."""
    executor_class, _ = detect_executor(shell, options, choice, host)
    scheduler = make_scheduler(shell, options, JobOptions(), executor_class.scheduler_class)
    scheduler.prepare()
    root = session_root(shell, options)
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
    in_use = {s.environment: s.name for s in sessions.values() if s.environment and s.name in live}
    clean_environments(head, f"{root}/envs", remove=envs, dry_run=dry_run, out=out, in_use=in_use)
    if sweep is not None and not remove_sweep(shell, scheduler, root, sweep, live, dry_run, out):
        return 1
    return 0


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
    endpoint, owner and environment records and whether they are older than any doctor run."""
    script = (
        f"cd {shlex.quote(root)} 2>/dev/null || exit 0\n"
        'for d in */; do d=${d%/}; [ -d "$d" ] || continue\n'
        '  [ -e "$d/secret" ] || [ -e "$d/bundle.zip" ] || continue\n'
        f'  old=$(find "$d" -maxdepth 0 -mmin +{DOCTOR_LEFTOVER_MINUTES} 2>/dev/null)\n'
        f'  printf "%s\\t%s\\t%s\\t%s\\t%s\\n" "$d" "${{old:+old}}" '
        f'"$(head -n 1 "$d/{ENDPOINT_RECORD}" 2>/dev/null)" "$(head -n 1 "$d/{OWNER_RECORD}" 2>/dev/null)" '
        f'"$(head -n 1 "$d/{ENVIRONMENT_RECORD}" 2>/dev/null)"\n'
        "done"
    )
    sessions = {}
    for line in shell.run(script, timeout=60).stdout.splitlines():
        name, old, endpoint, owner, key = (line.split("\t") + ["", "", "", ""])[:5]
        if plain_name(name):
            record = Owner.parse(owner) if owner.strip() else None
            environment = key.strip() if plain_name(key.strip()) else None
            sessions[name] = SessionDir(name, endpoint.strip() or None, old == "old", record, environment)
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
