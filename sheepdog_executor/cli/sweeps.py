"""``sheepdog-executor sweeps HOST``: the sweeps (``sweep=``) kept on a cluster, with their calls
done, running and failed and their size on disk; and the removal of one (``cleanup --sweep``).

The counts are made on the head node by ``awk`` over the records files (see ``remote/store.py``):
nothing of the records travels, and nothing in them is unpickled.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from sheepdog_executor.cli.common import run_on_head, session_root
from sheepdog_executor.remote.store import DETACHED, LEASE_FILE, RECORDS
from sheepdog_executor.scheduler import Scheduler
from sheepdog_executor.scheduler.base import plain_name
from sheepdog_executor.shell import Shell
from sheepdog_executor.sweepstore import SWEEPS_DIR

#: Per sweep: NAME, calls done, running (started, not ended: running, or lost with their worker),
#: queued (handed to the cluster by ``detach``, not started), failed (raised, not kept), kilobytes
#: on disk, the run that holds its lease.
_AWK = (
    '{ if ($1 == "R") r[$2] = 1; else if ($1 == "E") e[$2] = 1; else if ($1 == "S") s[$2] = 1; '
    'else if ($1 == "Q") q[$2] = 1; else a[$2] = 1 } '
    "END { for (k in s) if (!(k in r) && !(k in e) && !(k in a)) run++; "
    "for (k in e) if (!(k in r)) bad++; for (k in q) if (!(k in r) && !(k in e) && !(k in s)) queued++; "
    'for (k in r) done++; printf "%d %d %d %d", done, run, queued, bad }'
)
_COUNT = f"""for d in */; do d=${{d%/}}; [ -d "$d/{RECORDS}" ] || continue
  n=$( (sed "s/^/Q /" "$d/{DETACHED}"/*.keys; cat "$d/{RECORDS}"/*.log) 2>/dev/null | awk '{_AWK}')
  printf "%s %s %s %s\\n" "$d" "$n" "$(du -sk "$d" | cut -f1)" "$(head -n 1 "$d/{LEASE_FILE}" 2>/dev/null)"
done"""


def list_sweeps(shell: Shell, root: str) -> list[dict[str, str | int]]:
    """The sweeps under ``root`` on the head node: name, done, running, queued, failed, kilobytes,
    lease."""
    script = f"cd {shlex.quote(f'{root}/{SWEEPS_DIR}')} 2>/dev/null || exit 0\n{_COUNT}"
    found: list[dict[str, str | int]] = []
    for line in shell.run(script, timeout=300).stdout.splitlines():
        fields = line.split()
        if len(fields) >= 6 and plain_name(fields[0]) and all(f.isdigit() for f in fields[1:6]):
            done, running, queued, failed, size = (int(f) for f in fields[1:6])
            lease = fields[6] if len(fields) > 6 else ""
            row: dict[str, str | int] = {"name": fields[0], "done": done, "running": running}
            row.update(queued=queued, failed=failed, kilobytes=size, lease=lease)
            found.append(row)
    return found


def sweeps(host: str, out: TextIO | None = None) -> int:
    """Print the sweeps kept on ``host``; return the exit status."""
    out = out or sys.stdout
    return run_on_head(host, out, lambda shell, options: _print_sweeps(shell, options, host, out))


def _print_sweeps(shell: Shell, options: Mapping[str, Any], host: str, out: TextIO) -> int:
    """Print the table of the sweeps under the session root of ``shell``'s head node."""
    root = session_root(shell, options)
    rows = list_sweeps(shell, root)
    print(f"{'sweep':<24} {'done':>8} {'running':>8} {'queued':>8} {'failed':>8} {'size':>10}", file=out)
    for row in rows:
        size = f"{int(row['kilobytes']) / 1024:.1f} MB"
        print(
            f"{row['name']!s:<24} {row['done']:>8} {row['running']:>8} {row['queued']:>8} "
            f"{row['failed']:>8} {size:>10}",
            file=out,
        )
    print(f"{len(rows)} sweep(s) under {root}/{SWEEPS_DIR} on {host}", file=out)
    return 0


def remove_sweep(
    shell: Shell, scheduler: Scheduler, root: str, name: str, live: set[str], dry_run: bool, out: TextIO
) -> bool:
    """Remove sweep ``name`` unless the session that holds it (its lease) is alive (``live``:
    the sessions cleanup kept) or tasks it was handed to (``detach``) still run; True when it is
    (or would be) removed."""
    rows = {row["name"]: row for row in list_sweeps(shell, root)}
    row = rows.get(name)
    if row is None or not plain_name(name):
        print(f"no sweep {name!r} under {root}/{SWEEPS_DIR}", file=out)
        return False
    if row["lease"] in live:
        print(
            f"kept sweep {name}: session {row['lease']} uses it (its client is alive, or cannot be "
            "checked); shut that executor down first",
            file=out,
        )
        return False
    detached = scheduler.session_jobs(f"{root}/{SWEEPS_DIR}/{name}")
    if detached:
        jobs = ", ".join(sorted({job.id for job in detached}))
        print(f"kept sweep {name}: its detached calls still run (job {jobs}); attach() to it first", file=out)
        return False
    if not dry_run:
        shell.run(f"rm -rf {shlex.quote(f'{root}/{SWEEPS_DIR}/{name}')}", timeout=120)
    verb = "would remove" if dry_run else "removed"
    print(
        f"{verb} sweep {name}: {row['done']} kept result(s), {int(row['kilobytes']) / 1024:.1f} MB", file=out
    )
    return True
