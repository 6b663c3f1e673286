"""scikit-learn through joblib's "gridengine" backend: a grid search then a cross-validation, as a
user runs them one after the other, against the same work on this machine, in one run.

Each repetition, from nothing (no executor, no loky workers alive), runs

1. ``GridSearchCV(SVC(), 12 candidates, cv=5)``: one ``Parallel`` call of 60 fits, then
2. ``cross_val_score(best estimator, cv=8)``: one ``Parallel`` call of 8 fits,

under ``parallel_config(backend="gridengine", host=HOST)`` with the executor reused between the two
calls (the default) and without (``reuse=False``: each call opens its own executor: the behaviour
before reuse), and under ``parallel_config(backend="loky", n_jobs=2)`` on this machine. The cell's
jobs are named uniquely per mode and repetition; the jobs each mode submitted are counted with
``qstat`` (including finished jobs, ``qstat -s z``), and only those names are ever removed.

scikit-learn must be importable on the nodes: the script installs it (pinned to this client's
versions) for the cell's user with ``pip --target`` once, and the executor's ``setup`` puts it on
``PYTHONPATH``.

Run: ``python benchmarks/bench_joblib.py [--host fear] [--repeats 3] [--n-jobs -1,2]`` (about 2 min a
repetition on the 2-core test machine)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import joblib
from bench_map import Remote, package_revision
from node_packages import install, pinned
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.svm import SVC

from sheepdog_executor.integrations.joblib_backend import shutdown_reusable_executors

NODE_PACKAGES = ("scikit-learn", "numpy", "scipy", "joblib", "threadpoolctl")
GRID = {"C": [0.1, 1, 10, 100], "gamma": [1e-4, 1e-3, 1e-2]}  # 12 candidates x 5 folds = 60 fits


def workload() -> tuple[float, float, float, list[float]]:
    """Grid search then cross-validation under the active joblib config: their seconds, the best
    score and the cross-validation scores (to check every mode computed the same)."""
    x, y = load_digits(return_X_y=True)
    start = time.perf_counter()
    search = GridSearchCV(SVC(), GRID, cv=5).fit(x, y)
    searched = time.perf_counter()
    scores = cross_val_score(search.best_estimator_, x, y, cv=8)
    scored = time.perf_counter()
    return searched - start, scored - searched, float(search.best_score_), [float(s) for s in scores]


def jobs_named(remote: Remote, name: str) -> int:
    """How many jobs called ``name`` qstat knows: queued, running, or finished lately."""
    out = remote.run("qstat -xml && echo '<!-- finished -->' && qstat -s z -xml").stdout
    jobs = set()
    for document in out.split("<!-- finished -->"):
        for entry in ET.fromstring(document.strip()).iter("job_list"):
            if entry.findtext("JB_name") == name:
                jobs.add(entry.findtext("JB_job_number"))
    return len(jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="fear")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--n-jobs",
        default="-1,2",
        help="n_jobs values on the cell, comma-separated (-1, the default, means 32 workers)",
    )
    parser.add_argument("--local-n-jobs", type=int, default=2)
    parser.add_argument("--settle", type=float, default=6.0, help="seconds to wait for an idle cell")
    args = parser.parse_args(argv)
    print(f"sheepdog_executor {package_revision()}; scikit-learn workload: 60 fits then 8 fits")

    remote = Remote(args.host)
    names: list[str] = []
    try:
        target = install(remote.run, pinned(*NODE_PACKAGES), check_import="import sklearn.svm")
        setup = [f"export PYTHONPATH={target}"]

        def on_cell(n_jobs: int, reuse: bool) -> Callable[[str], Any]:
            return lambda name: joblib.parallel_config(
                backend="gridengine", host=args.host, n_jobs=n_jobs, setup=setup, job_name=name, reuse=reuse
            )

        modes: dict[str, Callable[[str], Any]] = {}
        for n_jobs in (int(n) for n in args.n_jobs.split(",")):
            modes[f"gridengine n_jobs={n_jobs}, reused"] = on_cell(n_jobs, True)
            modes[f"gridengine n_jobs={n_jobs}, reuse=False"] = on_cell(n_jobs, False)
        modes[f"loky n_jobs={args.local_n_jobs}"] = lambda name: joblib.parallel_config(
            backend="loky", n_jobs=args.local_n_jobs
        )
        seen: dict[str, list[tuple[float, float, int, int]]] = {mode: [] for mode in modes}
        reference: tuple[float, list[float]] | None = None
        for repeat in range(args.repeats):
            for index, (mode, config) in enumerate(modes.items()):
                busy = remote.settle(args.settle)
                name = f"{remote.job_name}m{index}r{repeat}"
                names.append(name)
                with config(name):
                    searched, scored, best, scores = workload()
                shutdown_reusable_executors()  # the next repetition starts from nothing
                joblib.externals.loky.get_reusable_executor().shutdown(wait=True)
                if reference is None:
                    reference = (best, scores)
                elif (best, scores) != reference:
                    raise AssertionError(f"{mode} computed other scores: {best} {scores}")
                jobs = jobs_named(remote, name) if mode.startswith("gridengine") else 0
                seen[mode].append((searched, scored, jobs, busy))
                load = os.getloadavg()[0]
                print(
                    f"  {mode:<34} run {repeat + 1}: grid search {searched:5.1f} s, "
                    f"cross_val_score {scored:5.1f} s, {jobs} jobs, {busy} busy, load {load:.1f}"
                )
        report(seen)
    finally:
        shutdown_reusable_executors()
        for name in names:
            remote.run(f"qdel {name} >/dev/null 2>&1; true", timeout=60)
        remote.close()
    return 0


def report(seen: dict[str, list[tuple[float, float, int, int]]]) -> None:
    local = next(mode for mode in seen if mode.startswith("loky"))
    local_total = statistics.median(s + c for s, c, _, _ in seen[local])

    def span(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"

    print()
    head = ("mode", "GridSearchCV (60 fits)", "cross_val_score (8)", "both")
    print(f"{head[0]:<34} {head[1]:<24} {head[2]:<24} {head[3]:<24} jobs   vs local")
    for mode, runs in seen.items():
        searched = [s for s, _, _, _ in runs]
        scored = [c for _, c, _, _ in runs]
        both = [s + c for s, c, _, _ in runs]
        jobs = "/".join(str(j) for _, _, j, _ in runs) if not mode.startswith("loky") else "-"
        ratio = statistics.median(both) / local_total
        print(f"{mode:<34} {span(searched):<24} {span(scored):<24} {span(both):<24} {jobs:<6} {ratio:.2f}x")
    print("(median of the runs, range in brackets; jobs: how many each run submitted)")


if __name__ == "__main__":
    raise SystemExit(main())
