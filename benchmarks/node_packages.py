"""Install Python packages for the cell's user (``pip --target`` into its cache), pinned to the
versions this client runs, once: the nodes and the head node then import them with ``PYTHONPATH``.

Used by the benchmarks that need more on the cell than a bare interpreter: scikit-learn for
``bench_joblib.py``, dask-jobqueue (and the other peers) for ``bench_peers.py``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shlex
import subprocess
from collections.abc import Callable

#: Runs a shell command on the head node as the cell's user (e.g. ``Remote.run`` of bench_map).
Run = Callable[..., subprocess.CompletedProcess[str]]


def pinned(*names: str) -> list[str]:
    """``name==version`` for each package, at the version installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def install(run: Run, packages: list[str], python: str = "python3", check_import: str = "") -> str:
    """Install ``packages`` for ``python`` on the head node unless a finished install is there;
    return the directory to put on ``PYTHONPATH``. Into a fresh directory renamed into place, so
    that a concurrent or interrupted run never sees half an install."""
    digest = hashlib.sha256(" ".join(sorted(packages)).encode()).hexdigest()[:12]
    version = run(f"{python} -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").stdout.strip()
    target = f"$HOME/.cache/sheepdog-bench/py{version}-{digest}"
    quoted = " ".join(shlex.quote(p) for p in packages)
    probe = f'PYTHONPATH="$d" {python} -c {shlex.quote(check_import)}' if check_import else "true"
    script = f"""
        set -e
        d="{target}"
        if [ ! -d "$d" ]; then
            mkdir -p "$(dirname "$d")"
            t=$(mktemp -d "$d.XXXXXX")
            {python} -m pip install --quiet --disable-pip-version-check --no-warn-script-location \\
                --target "$t" {quoted} || {{ rm -rf "$t"; exit 1; }}
            mv -T "$t" "$d" 2>/dev/null || rm -rf "$t"
        fi
        {probe}
        echo "$d"
        """
    done = run(script, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"could not install {packages} on the cell:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]
