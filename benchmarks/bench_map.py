"""How fast GridEngineExecutor runs many small calls, against the baselines it must beat, in one run.

Measures, on a real Grid Engine cell reached over SSH (``--host``, default ``fear``):

1. cold map: ``GridEngineExecutor(host=..., max_workers=8)``, ``map(f, range(N))`` of a trivial
   module-level ``f``, and ``shutdown()``; the time includes creating and shutting down the executor;
2. warm throughput: maps of many calls on an executor whose 8 workers already run -> calls/s;
3. single-call latency: submit to result of one call when no worker is alive (a job has to be
   scheduled), against a bare ``qsub -sync y -b y /bin/true`` over ssh, interleaved;
4. one Grid Engine task per call: a bare ``qsub -sync y -t 1-200 -b y /bin/true`` array over ssh
   -> tasks/s, and the time N calls would take at that rate;
5. ``ProcessPoolExecutor(8).map`` of the same N calls on this machine (chunksize 1 and 100).

Every figure comes from the same run and is printed in one table with its target and its ratio to
the baseline. The baselines' ssh commands share one OpenSSH connection (ControlMaster), as the
executor shares one paramiko connection, so neither pays for connecting per command. The cell may be
shared: before each measurement the script waits (``--settle`` seconds at most) for other jobs to
leave it, and prints the slots that were busy anyway.

With ``--scheduler slurm`` (host default ``fear-slurm``) the same figures for ``SlurmExecutor``, and
the baselines are a bare ``sbatch --wait --wrap true`` and ``sbatch --wait --array=1-200``.

Run: ``python benchmarks/bench_map.py [--scheduler gridengine|slurm] [--host fear] [--calls 10000] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

import sheepdog_executor
from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor

WORKERS = 8
COLD_TARGET_S = 4.0  # for 10,000 calls
WARM_TARGET_CPS = 5000.0
LATENCY_MARGIN_S = 0.5


#: The executor measured and the bare command it is compared with (``--scheduler``).
EXECUTORS: dict[str, type[ClusterExecutor]] = {"gridengine": GridEngineExecutor, "slurm": SlurmExecutor}
BARE = {"gridengine": "qsub -sync y -b y /bin/true", "slurm": "sbatch --wait --wrap true"}
Executor: type[ClusterExecutor] = GridEngineExecutor
bare = BARE["gridengine"]


def f(x: int) -> int:
    """The trivial call every map runs."""
    return x + 1


def check(results: list[Any], calls: int) -> None:
    if results != [f(i) for i in range(calls)]:
        raise AssertionError("wrong results")


# -- the cell over OpenSSH (baselines, and how busy the cell is) -------------------------------------
class Remote:
    """Commands on the cell with OpenSSH over one multiplexed connection (ControlMaster)."""

    def __init__(self, host: str, scheduler: str = "gridengine") -> None:
        self.host = host
        self.slurm = scheduler == "slurm"
        self._dir = tempfile.mkdtemp(prefix="sdbench-")
        self._options = [
            "-o",
            "BatchMode=yes",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self._dir}/cm",
        ]
        self._options += ["-o", "ControlPersist=300"]
        self.job_name = f"sdbench{secrets.token_hex(4)}"  # unique: only our own jobs carry it

    def run(self, command: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", *self._options, self.host, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def timed(self, command: str, timeout: float = 300.0) -> float:
        """Seconds a command takes; raise if it fails."""
        start = time.perf_counter()
        done = self.run(command, timeout)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(
                f"{command!r} failed ({done.returncode}): {(done.stderr or done.stdout)[-500:]}"
            )
        return elapsed

    def qsub_sync(self, tasks: int = 1) -> float:
        """A bare qsub -sync y of /bin/true (an array of ``tasks`` when more than one); with Slurm, a
        bare sbatch --wait of true."""
        if self.slurm:
            array = f" --array=1-{tasks}" if tasks > 1 else ""
            options = f"--wait{array} -J {self.job_name} -o /dev/null -e /dev/null"
            return self.timed(f"sbatch {options} --wrap true >/dev/null")
        array = f" -t 1-{tasks}" if tasks > 1 else ""
        options = f"-sync y{array} -b y -N {self.job_name} -o /dev/null -e /dev/null"
        return self.timed(f"qsub {options} /bin/true >/dev/null")

    def busy(self) -> tuple[int, int]:
        """(slots of running jobs, pending tasks) on the cell, of any user; (-1, -1) if unknown."""
        if self.slurm:
            listed = self.run('squeue -h -r -o "%T %C"', timeout=60)
            if listed.returncode != 0:
                return -1, -1
            rows = [line.split() for line in listed.stdout.splitlines() if line.strip()]
            running = sum(int(cpus) for state, cpus in rows if state != "PENDING")
            return running, sum(1 for state, _ in rows if state == "PENDING")
        done = self.run('qstat -xml -u "*"', timeout=60)
        if done.returncode != 0:
            return -1, -1
        running = pending = 0
        for job in ET.fromstring(done.stdout).iter("job_list"):
            if job.get("state") == "running":
                running += int(job.findtext("slots") or 1)
            else:
                pending += 1
        return running, pending

    def settle(self, seconds: float) -> int:
        """Wait up to ``seconds`` for the cell to be empty; return the slots still running."""
        deadline = time.monotonic() + seconds
        while True:
            running, pending = self.busy()
            if (running, pending) == (0, 0) or running < 0 or time.monotonic() >= deadline:
                return running
            time.sleep(0.5)

    def close(self) -> None:
        try:
            cancel = "scancel -n" if self.slurm else "qdel"
            self.run(f"{cancel} {self.job_name} >/dev/null 2>&1; true", timeout=60)  # left by an interruption
        finally:
            argv = ["ssh", *self._options, "-O", "exit", self.host]
            subprocess.run(argv, capture_output=True, timeout=30, check=False)
            shutil.rmtree(self._dir, ignore_errors=True)


# -- the measurements ------------------------------------------------------------------------------
def tasks_started(executor: ClusterExecutor) -> int:
    """Array tasks whose worker reached this client (private state: this is a benchmark)."""
    return len(getattr(getattr(executor._session, "dispatcher", None), "tasks_seen", ()))


def live_workers(executor: ClusterExecutor) -> int | None:
    """Workers that said hello and did not stop yet (private state: this is a benchmark)."""
    workers = getattr(getattr(executor._session, "dispatcher", None), "workers", None)
    return None if workers is None else len(workers)


def cold_map(host: str, calls: int) -> tuple[float, dict[str, float], int]:
    """Create an executor, map ``calls`` trivial calls, shut it down: total, phases, tasks started."""
    start = time.perf_counter()
    executor = Executor(host=host, max_workers=WORKERS)
    created = time.perf_counter()
    with executor:
        results = executor.map(f, range(calls))
        queued = time.perf_counter()
        first = next(results)
        first_at = time.perf_counter()
        rest = list(results)
        mapped = time.perf_counter()
        started = tasks_started(executor)
    end = time.perf_counter()
    check([first, *rest], calls)
    parts = {
        "create": created - start,
        "map() call": queued - created,
        "then first result": first_at - queued,
        "rest": mapped - first_at,
        "shutdown": end - mapped,
    }
    return end - start, parts, started


def warm_throughput(host: str, calls: int, repeats: int) -> tuple[list[float], list[float]]:
    """calls/s of maps on an executor whose workers all run already, and the share of each map's
    time spent in the map() call itself (pickling and queueing, before any call goes out)."""
    rates, queueing = [], []
    # A long idle_timeout keeps the warm workers alive between the warm-up and the timed maps.
    with Executor(host=host, max_workers=WORKERS, idle_timeout=60) as executor:
        warmup = 4 * WORKERS * 100
        check(list(executor.map(f, range(warmup))), warmup)
        deadline = time.monotonic() + 60
        while (live_workers(executor) or 0) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.05)
        jobs_before = len(executor.job_ids)
        for _ in range(repeats):
            start = time.perf_counter()
            results = executor.map(f, range(calls))
            queued = time.perf_counter()
            values = list(results)
            elapsed = time.perf_counter() - start
            check(values, calls)
            rates.append(calls / elapsed)
            queueing.append((queued - start) / elapsed)
        alive = live_workers(executor)
        if len(executor.job_ids) != jobs_before or (alive is not None and alive < WORKERS):
            print(f"\n  warning: only {alive} warm workers (jobs {executor.job_ids})", end="")
    return rates, queueing


def single_call_latency(host: str) -> float:
    """Submit to result of one call on a fresh executor: no worker alive, a job must be scheduled."""
    with Executor(host=host, max_workers=WORKERS) as executor:
        start = time.perf_counter()
        value = executor.submit(f, 41).result()
        elapsed = time.perf_counter() - start
    if value != 42:
        raise AssertionError(f"f(41) returned {value!r}")
    return elapsed


def pool_map(calls: int, chunksize: int) -> float:
    """ProcessPoolExecutor(8): create, map, shut down."""
    start = time.perf_counter()
    with ProcessPoolExecutor(WORKERS) as pool:
        results = list(pool.map(f, range(calls), chunksize=chunksize))
    elapsed = time.perf_counter() - start
    check(results, calls)
    return elapsed


# -- the report ------------------------------------------------------------------------------------
@dataclass
class Figures:
    calls: int
    warm_calls: int
    array_tasks: int
    cold: list[float] = field(default_factory=list)
    cold_parts: list[dict[str, float]] = field(default_factory=list)
    cold_tasks: list[int] = field(default_factory=list)
    warm_cps: list[float] = field(default_factory=list)
    warm_queueing: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    qsub_sync: list[float] = field(default_factory=list)
    array_s: float = float("nan")
    pool: dict[int, list[float]] = field(default_factory=dict)
    ssh_rtt: list[float] = field(default_factory=list)
    busy: dict[str, list[int]] = field(default_factory=dict)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def runs(values: list[float], digits: int = 2) -> str:
    return "/".join(f"{v:.{digits}f}" for v in values)


def seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"


def than(baseline: float, ours: float, what: str) -> str:
    """'12x faster than what' when ours takes less time than the baseline, else 'Nx slower than'."""
    ratio = baseline / ours
    return f"{ratio:.1f}x faster than {what}" if ratio >= 1 else f"{1 / ratio:.1f}x slower than {what}"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def package_revision() -> str:
    """Where sheepdog_executor was imported from, and its git revision when it is a checkout."""
    where = Path(sheepdog_executor.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return str(where)
    if head.returncode != 0:
        return f"{where} (not a git checkout)"
    state = " + uncommitted changes" if dirty.stdout.strip() else ""
    return f"{where} at {head.stdout.strip()}{state}"


def report(fig: Figures) -> None:
    n = fig.calls
    cold, warm = median(fig.cold), median(fig.warm_cps)
    latency, qsub = median(fig.latency), median(fig.qsub_sync)
    rate = fig.array_tasks / fig.array_s
    projected = n / rate
    pool1, pool100 = median(fig.pool.get(1, [])), median(fig.pool.get(100, []))
    pool1_cps = n / pool1
    middle = fig.cold.index(sorted(fig.cold)[(len(fig.cold) - 1) // 2])
    parts = ", ".join(f"{k} {v:.2f}" for k, v in fig.cold_parts[middle].items())

    cold_target = f"< {COLD_TARGET_S:.0f} s {verdict(cold < COLD_TARGET_S)}" if n == 10000 else "(for 10k)"
    rows = [
        (
            f"executor {n:,} calls cold (create+map+shutdown)",
            seconds(cold),
            cold_target,
            f"{than(projected, cold, 'one task per call')}; {than(pool1, cold, 'ProcessPool chunksize=1')}",
        ),
        (
            "  phases of the median run (s)",
            "",
            "",
            f"{parts}; {fig.cold_tasks[middle]}/{WORKERS} tasks started",
        ),
        (
            f"executor warm throughput ({fig.warm_calls:,} calls)",
            f"{warm:,.0f} calls/s",
            f"> {WARM_TARGET_CPS:,.0f} {verdict(warm > WARM_TARGET_CPS)}",
            f"{warm / rate:,.0f}x one task per call; {warm / pool1_cps:.1f}x ProcessPool chunksize=1 "
            f"({pool1_cps:,.0f} calls/s)",
        ),
        (
            "  spent in the map() call before any dispatch",
            f"{median(fig.warm_queueing):.0%}",
            "",
            "pickling the arguments and making Futures; the warm workers wait meanwhile",
        ),
        (
            f"executor single-call latency (median of {len(fig.latency)})",
            seconds(latency),
            f"<= bare + {LATENCY_MARGIN_S} s {verdict(latency <= qsub + LATENCY_MARGIN_S)}",
            f"{latency - qsub:+.2f} s vs {bare} ({latency / qsub:.2f}x its time)",
        ),
        (f"{bare} (median of {len(fig.qsub_sync)})", seconds(qsub), "baseline", ""),
        (
            f"{bare}, array of {fig.array_tasks}",
            f"{rate:.1f} tasks/s",
            "baseline",
            f"{fig.array_s:.1f} s for {fig.array_tasks} tasks; {n:,} calls would take {seconds(projected)}",
        ),
        (
            f"ProcessPoolExecutor(8) {n:,} calls chunksize=1",
            seconds(pool1),
            "baseline",
            f"{pool1_cps:,.0f} calls/s incl. start-up",
        ),
        (
            f"ProcessPoolExecutor(8) {n:,} calls chunksize=100",
            seconds(pool100),
            "baseline",
            f"executor cold: {than(pool100, cold, 'this')}",
        ),
        ("ssh round trip, multiplexed (median)", f"{median(fig.ssh_rtt) * 1000:.0f} ms", "info", ""),
    ]
    header = ("figure", "value", "target", "ratio vs baseline")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    print()
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        )
        if row is header:
            print("-" * (sum(widths) + 6 + max(len(r[3]) for r in rows)))
    print()
    print(
        f"runs (s): cold {runs(fig.cold)}; latency {runs(fig.latency)}; bare {runs(fig.qsub_sync)}; "
        f"pool chunksize=1 {runs(fig.pool.get(1, []))}, =100 {runs(fig.pool.get(100, []))}; "
        f"warm calls/s {runs(fig.warm_cps, 0)}"
    )
    busy = "; ".join(f"{phase} {slots}" for phase, slots in fig.busy.items())
    print(f"cell slots other jobs still held when each measurement began: {busy}")
    print(
        f"summary: executor {n:,} calls: {cold:.1f} s = {projected / cold:.0f}x faster than one task per "
        f"call; {cold / pool1:.1f}x the time of ProcessPoolExecutor(chunksize=1), "
        f"{cold / pool100:.0f}x that of chunksize=100"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--scheduler", choices=sorted(EXECUTORS), default="gridengine", help="which executor")
    parser.add_argument("--host", help="ssh host (or ~/.ssh/config alias) of the cell (fear, fear-slurm)")
    parser.add_argument("--calls", type=int, default=10000, help="calls of the cold map and the pool maps")
    parser.add_argument("--warm-calls", type=int, default=50000, help="calls of each warm map")
    parser.add_argument("--array-tasks", type=int, default=200, help="tasks of the bare qsub array")
    parser.add_argument(
        "--settle", type=float, help="wait up to this long for a quiet cell (default 6, quick 2)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    args = parser.parse_args(argv)
    global Executor, bare
    Executor, bare = EXECUTORS[args.scheduler], BARE[args.scheduler]
    args.host = args.host or {"gridengine": "fear", "slurm": "fear-slurm"}[args.scheduler]
    if __name__ != "__main__":  # imported, not run: still send f to the workers by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cold_runs, warm_runs, latency_runs, pool_runs = (1, 1, 3, 1) if args.quick else (3, 2, 5, 3)
    settle = args.settle if args.settle is not None else (2.0 if args.quick else 6.0)

    print(f"sheepdog_executor: {package_revision()}; {Executor.__name__} on {args.host}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs here, load {os.getloadavg()[0]:.2f}")
    fig = Figures(calls=args.calls, warm_calls=args.warm_calls, array_tasks=args.array_tasks)
    remote = Remote(args.host, args.scheduler)
    began = time.perf_counter()

    def measuring(phase: str, title: str) -> None:
        fig.busy.setdefault(phase, []).append(remote.settle(settle))
        print(f"  {title} ...", end="", flush=True)

    def took(start: float) -> None:
        print(f" {time.perf_counter() - start:.1f} s", flush=True)

    try:
        remote.timed("true")  # opens the shared connection
        fig.ssh_rtt = [remote.timed("true") for _ in range(5)]
        for i in range(cold_runs):
            measuring("cold", f"cold map {i + 1}/{cold_runs}")
            start = time.perf_counter()
            total, parts, started = cold_map(args.host, args.calls)
            fig.cold.append(total)
            fig.cold_parts.append(parts)
            fig.cold_tasks.append(started)
            took(start)
        measuring("warm", f"warm throughput, {warm_runs} x {args.warm_calls:,} calls")
        start = time.perf_counter()
        fig.warm_cps, fig.warm_queueing = warm_throughput(args.host, args.warm_calls, warm_runs)
        took(start)
        for i in range(latency_runs):  # interleaved: both see the same cell
            measuring("latency", f"single-call latency {i + 1}/{latency_runs}, executor then {bare}")
            start = time.perf_counter()
            fig.latency.append(single_call_latency(args.host))
            fig.qsub_sync.append(remote.qsub_sync())
            took(start)
        measuring("array", f"{bare} array of {args.array_tasks} tasks")
        start = time.perf_counter()
        fig.array_s = remote.qsub_sync(args.array_tasks)
        took(start)
        for chunksize in (1, 100):
            print(
                f"  ProcessPoolExecutor(8) chunksize={chunksize}, {pool_runs} run(s) ...", end="", flush=True
            )
            start = time.perf_counter()
            fig.pool[chunksize] = [pool_map(args.calls, chunksize) for _ in range(pool_runs)]
            took(start)
    finally:
        remote.close()
    print(f"  all measured in {time.perf_counter() - began:.0f} s")
    report(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
