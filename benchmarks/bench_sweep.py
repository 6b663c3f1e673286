"""What keeping results costs, and what a rerun of a finished sweep saves (``sweep=``), in one run.

On a real cell over SSH (``--host``, default ``fear``; ``--scheduler slurm`` for ``fear-slurm``),
each repetition measures, for a map of ``--calls`` trivial calls with 8 workers, from creating the
executor to its shutdown:

1. without a sweep (the baseline: running them);
2. with a new sweep (every result kept by the workers as they finish);
3. a rerun of that sweep in a new executor: every result served from the store, no job submitted;

and prints the medians, the overhead of keeping (2 - 1) and the rerun against running (3 vs 1), and
the store's size on disk. Each sweep is removed afterwards.

Run: ``python benchmarks/bench_sweep.py [--scheduler gridengine|slurm] [--host fear] [--calls 10000]
[--repeat 3]``
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, SlurmExecutor

EXECUTORS: dict[str, type[ClusterExecutor]] = {"gridengine": GridEngineExecutor, "slurm": SlurmExecutor}
HOSTS = {"gridengine": "fear", "slurm": "fear-slurm"}


def square(x: int) -> int:
    return x * x


def timed_map(
    executor_class: type[ClusterExecutor], host: str, calls: int, **options: object
) -> tuple[float, dict[str, object]]:
    """Seconds from creating an executor to its shutdown around one map; what its sweep did."""
    started = time.perf_counter()
    with executor_class(host=host, max_workers=8, progress=False, **options) as executor:
        assert list(executor.map(square, range(calls))) == [x * x for x in range(calls)]
        sweep = executor.sweep
        facts: dict[str, object] = {"jobs": len(executor.job_ids)}
        if sweep is not None:
            facts.update(served=sweep.served, sent=sweep.sent, directory=sweep.directory)
            size = executor._session.shell.run(f"du -sk {sweep.directory} | cut -f1", timeout=60).stdout
            facts["kilobytes"] = int(size.strip() or 0)
    return time.perf_counter() - started, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scheduler", choices=sorted(EXECUTORS), default="gridengine")
    parser.add_argument("--host")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    executor_class, host = EXECUTORS[args.scheduler], args.host or HOSTS[args.scheduler]
    plain, kept, rerun, sizes = [], [], [], []
    for repetition in range(args.repeat):
        name = f"bench-{secrets.token_hex(4)}"
        seconds, _ = timed_map(executor_class, host, args.calls)
        plain.append(seconds)
        seconds, first = timed_map(executor_class, host, args.calls, sweep=name)
        kept.append(seconds)
        seconds, second = timed_map(executor_class, host, args.calls, sweep=name)
        rerun.append(seconds)
        assert second["served"] == args.calls and second["jobs"] == 0, second
        sizes.append(int(first["kilobytes"]))  # type: ignore[call-overload]
        print(
            f"run {repetition + 1}: plain {plain[-1]:.2f} s, kept {kept[-1]:.2f} s, rerun {rerun[-1]:.2f} s"
        )
        with executor_class(host=host, max_workers=1, progress=False) as cleaner:
            cleaner._session.shell.run(f"rm -rf {first['directory']}", timeout=60)
    p, k, r = (statistics.median(x) for x in (plain, kept, rerun))
    print(
        f"\n{args.calls:,} calls on {args.scheduler} ({host}), median of {args.repeat}, create to shutdown:"
    )
    print(f"  without a sweep (running them)       {p:7.2f} s")
    print(f"  with a new sweep (keeping them)      {k:7.2f} s   overhead {k - p:+.2f} s ({(k - p) / p:+.0%})")
    print(f"  rerun: all {args.calls:,} served, no job   {r:7.2f} s   {p / r:.1f}x faster than running them")
    print(
        f"  store on disk                        {statistics.median(sizes) / 1024:7.2f} MB "
        f"({statistics.median(sizes) * 1024 / args.calls:.0f} bytes per kept result)"
    )


if __name__ == "__main__":
    main()
