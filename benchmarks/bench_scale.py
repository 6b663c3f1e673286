"""Scale: many submits, many pending futures, big arguments, a million calls; with
``ProcessPoolExecutor`` measured in the same run.

Each figure is measured in a fresh child process (``--child SCENARIO``), so that its peak RSS
(``VmHWM``, the client process only) belongs to that figure alone. Figures, for ``GridEngineExecutor``
on the cell (``--host``, default ``fear``) and ``ProcessPoolExecutor`` with the same ``--workers``:

1. ``submit``: 100,000 ``submit()`` calls then all their results: seconds, seconds inside
   ``submit``, the submitting thread's CPU per ``submit``, peak RSS (100k pending futures);
2. ``map``: ``map`` of 100,000 calls, all results: seconds, peak RSS;
3. ``warm``: throughput of maps of trivial calls, chunksize=1, on running workers (calls/s);
4. ``cold``: 10,000 calls from nothing: create, ``map``, ``shutdown`` (seconds, and each phase);
5. ``million``: 1,000,000 calls, chunksize=1, from nothing: seconds, peak RSS;
6. ``bigargs``: ``map`` over 1,000 arguments of 1 MB each (kept by the caller, as a list of arrays
   would be): peak RSS;
7. ``lazy``: ``map`` over ``itertools.count()`` with ``buffersize=1000``, 200,000 results consumed:
   peak RSS (bounded; a plain map over an endless iterator would never return).

Run: ``python benchmarks/bench_scale.py [--host fear] [--workers 8] [--repeat 2] [--only warm,cold]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MB = 1024 * 1024


def f(x: int) -> int:
    """The trivial call."""
    return x + 1


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- scenarios, run in a child process -------------------------------------------------------------
def make(kind: str, host: str, workers: int, **options: Any) -> Executor:
    if kind == "pool":
        return ProcessPoolExecutor(workers)
    from sheepdog_executor import GridEngineExecutor

    return GridEngineExecutor(host=host, max_workers=workers, progress=False, **options)


def warm_up(executor: Executor, workers: int) -> None:
    """Start every worker (the pool's processes, the executor's tasks) before timing."""
    list(executor.map(f, range(workers * 400)))
    workers_of = getattr(getattr(getattr(executor, "_session", None), "dispatcher", None), "workers", None)
    deadline = time.monotonic() + 60
    while workers_of is not None and len(workers_of) < workers and time.monotonic() < deadline:
        time.sleep(0.05)


def scenario_submit(kind: str, host: str, workers: int, n: int) -> dict[str, float]:
    with make(kind, host, workers, idle_timeout=60) as executor:
        warm_up(executor, workers)
        start, cpu = time.perf_counter(), time.thread_time()
        futures = [executor.submit(f, i) for i in range(n)]
        submitted, cpu_used = time.perf_counter(), time.thread_time() - cpu
        ok = all(future.result() == i + 1 for i, future in enumerate(futures))
        end = time.perf_counter()
    return {
        "seconds": end - start,
        "in_submit": submitted - start,
        "cpu_us_per_submit": 1e6 * cpu_used / n,
        "ok": ok,
    }


def scenario_map(kind: str, host: str, workers: int, n: int) -> dict[str, float]:
    with make(kind, host, workers, idle_timeout=60) as executor:
        warm_up(executor, workers)
        start = time.perf_counter()
        ok = all(r == i + 1 for i, r in enumerate(executor.map(f, range(n))))
        end = time.perf_counter()
    return {"seconds": end - start, "ok": ok}


def scenario_warm(kind: str, host: str, workers: int, n: int, chunksize: int = 1) -> dict[str, float]:
    rates = []
    with make(kind, host, workers, idle_timeout=60) as executor:
        warm_up(executor, workers)
        ok = True
        for _ in range(3):
            start = time.perf_counter()
            ok &= all(r == i + 1 for i, r in enumerate(executor.map(f, range(n), chunksize=chunksize)))
            rates.append(n / (time.perf_counter() - start))
    return {"calls_per_s": statistics.median(rates), "best": max(rates), "ok": ok}


def scenario_cold(kind: str, host: str, workers: int, n: int) -> dict[str, float]:
    start = time.perf_counter()
    executor = make(kind, host, workers)
    created = time.perf_counter()
    results = executor.map(f, range(n))
    first = next(results)
    first_at = time.perf_counter()
    ok = first == 1 and all(r == i + 2 for i, r in enumerate(results))
    mapped = time.perf_counter()
    executor.shutdown(wait=True)
    end = time.perf_counter()
    return {
        "seconds": end - start,
        "create": created - start,
        "first": first_at - created,
        "rest": mapped - first_at,
        "shutdown": end - mapped,
        "ok": ok,
    }


def scenario_bigargs(kind: str, host: str, workers: int, n: int) -> dict[str, float]:
    data = [os.urandom(MB) for _ in range(n)]
    with make(kind, host, workers) as executor:
        start = time.perf_counter()
        ok = list(executor.map(len, data)) == [MB] * n
        end = time.perf_counter()
    return {"seconds": end - start, "ok": ok}


def scenario_lazy(kind: str, host: str, workers: int, n: int) -> dict[str, float]:
    with make(kind, host, workers) as executor:
        start = time.perf_counter()
        results = executor.map(f, itertools.count(), buffersize=1000)
        ok = all(r == i + 1 for i, r in zip(range(n), results, strict=False))
        end = time.perf_counter()
        del results
    return {"seconds": end - start, "ok": ok}


SCENARIOS: dict[str, tuple[Callable[..., dict[str, float]], int]] = {
    "submit": (scenario_submit, 100_000),
    "map": (scenario_map, 100_000),
    "warm": (scenario_warm, 100_000),
    "cold": (scenario_cold, 10_000),
    "million": (scenario_cold, 1_000_000),
    "bigargs": (scenario_bigargs, 1_000),
    "lazy": (scenario_lazy, 200_000),
}


def child(name: str, kind: str, host: str, workers: int) -> None:
    if __name__ != "__main__":
        raise RuntimeError("run as a script")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    fn, n = SCENARIOS[name]
    figures = fn(kind, host, workers, n)
    figures["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(figures))


# -- the parent: runs each scenario in a child, prints one table ------------------------------------
def run_child(name: str, kind: str, host: str, workers: int) -> dict[str, float]:
    argv = [sys.executable, str(HERE), "--child", name, "--kind", kind, "--host", host]
    done = subprocess.run(
        [*argv, "--workers", str(workers)], capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        return {"error": 1.0, "stderr": done.stderr[-1500:]}  # type: ignore[dict-item]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def summary(name: str, results: list[dict[str, float]]) -> str:
    good = [r for r in results if "error" not in r]
    if not good:
        return f"FAILED: {results[-1].get('stderr')}"
    keys = [k for k in good[0] if k != "ok"]
    parts = []
    for key in keys:
        values = [r[key] for r in good]
        value = statistics.median(values)
        if key == "calls_per_s" or key == "best":
            parts.append(f"{key} {value:,.0f}")
        elif key == "peak_rss_mb":
            parts.append(f"peak RSS {value:,.0f} MB")
        else:
            parts.append(f"{key} {value:.2f}")
    runs = ", ".join("/".join(f"{r.get(k, 0):.2f}" for r in good) for k in keys[:1])
    wrong = "" if all(r.get("ok") for r in good) else "  WRONG RESULTS"
    return "; ".join(parts) + f"  (runs: {runs}){wrong}"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="fear")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each figure (million: 1)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="executor", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.kind, args.host, args.workers)
        return 0
    sys.path.insert(0, str(HERE.parent))
    from bench_map import package_revision  # noqa: E402 - the same header as bench_map

    print(f"sheepdog_executor: {package_revision()}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    for name in args.only.split(","):
        repeat = 1 if name == "million" else args.repeat
        for kind in ("executor", "pool"):
            if kind == "pool" and (name == "million" or (name == "lazy" and sys.version_info < (3, 14))):
                continue  # a million at chunksize=1 takes minutes; buffersize= needs Python 3.14
            results = []
            for _ in range(repeat):
                results.append(run_child(name, kind, args.host, args.workers))
            label = "GridEngineExecutor" if kind == "executor" else f"ProcessPoolExecutor({args.workers})"
            print(f"{name:8s} {label:24s} {summary(name, results)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
