"""sheepdog-executor against its peers on the same cell, in the same run: 10,000 trivial calls
from nothing, with 8 workers.

- sheepdog-executor, from this client over SSH: create ``GridEngineExecutor(max_workers=8)``,
  ``map``, ``shutdown`` (``cold_map`` of ``bench_map.py``);
- dask-jobqueue: ``SGECluster`` (8 single-core workers), ``Client.map``, ``gather``, close;
- parsl: ``HighThroughputExecutor`` on a ``GridEngineProvider`` (8 blocks of one worker), one
  ``python_app`` call per item, results, ``cleanup``;
- ipyparallel: ``Cluster(engines="sge", n=8)`` (an 8-task array job), ``map_sync`` on a
  load-balanced view, stop.

The peers run on the head node as the cell's user, as their users run them (``peers_on_head.py``,
over ssh), with their packages installed for that user at this client's versions (``pip --target``,
once; the optional ``bench`` extra installs them here). Their timings start after their imports.
Every peer's jobs carry a name unique to the run and the repetition; only those are ever removed.

Run: ``python benchmarks/bench_peers.py [--host fear] [--calls 10000] [--repeats 3]
[--peers dask,parsl,ipyparallel]``
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from bench_map import Remote, cold_map, package_revision
from node_packages import install, pinned

WORKERS = 8
#: What each peer needs on the head node and its workers, and a quick import to check the install.
PEERS = {
    "dask": (("dask", "distributed", "dask-jobqueue"), "import dask_jobqueue, distributed"),
    "parsl": (("parsl",), "import parsl.providers, parsl.executors.high_throughput"),
    "ipyparallel": (("ipyparallel",), "import ipyparallel"),
}
HEAD_SCRIPT = Path(__file__).with_name("peers_on_head.py")


def remove_jobs(remote: Remote, name: str, within: float = 60.0) -> None:
    """qdel every job called ``name`` (only those), and wait until qstat no longer lists them."""
    deadline = time.monotonic() + within
    while True:
        remote.run(f"qdel {name} >/dev/null 2>&1; true", timeout=60)
        out = remote.run("qstat -xml", timeout=60).stdout
        left = [e for e in ET.fromstring(out).iter("job_list") if e.findtext("JB_name") == name]
        if not left or time.monotonic() > deadline:
            return
        time.sleep(1)


def run_peer(remote: Remote, peer: str, packages: str, calls: int, name: str) -> dict[str, float]:
    """One run of a peer on the head node; its phases in seconds."""
    logs = f"$HOME/.cache/sheepdog-bench/logs/{name}"
    command = (
        f'cd "$HOME/.cache/sheepdog-bench" && PYTHONPATH={packages} python3 peers_on_head.py '
        f'{peer} {calls} {WORKERS} {name} "{logs}"; status=$?; rm -rf "{logs}"; exit $status'
    )
    try:
        done = remote.run(command, timeout=900)
    finally:
        remove_jobs(remote, name)
    if done.returncode != 0:
        raise RuntimeError(f"{peer} failed: {(done.stderr or done.stdout)[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="fear")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--settle", type=float, default=6.0, help="seconds to wait for an idle cell")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.peers.split(","))) - set(PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}: choose from {', '.join(PEERS)}")
    print(f"sheepdog_executor {package_revision()}: {args.calls:,} calls from nothing, {WORKERS} workers")

    remote = Remote(args.host)
    try:
        script = base64.b64encode(HEAD_SCRIPT.read_bytes()).decode()
        remote.run(
            f'mkdir -p "$HOME/.cache/sheepdog-bench" && echo {script} | base64 -d '
            '> "$HOME/.cache/sheepdog-bench/peers_on_head.py"'
        )
        installed: dict[str, str] = {}
        not_measured: dict[str, str] = {}
        for peer in filter(None, args.peers.split(",")):
            names, check = PEERS[peer]
            try:
                installed[peer] = install(remote.run, pinned(*names), check_import=check)
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                not_measured[peer] = f"not installable here: {str(exc)[-300:]}"

        seen: dict[str, list[float]] = {"sheepdog-executor": [], **{peer: [] for peer in installed}}
        phases: dict[str, list[dict[str, float]]] = {who: [] for who in seen}
        for repeat in range(args.repeats):
            for who in list(seen):
                busy = remote.settle(args.settle)
                try:
                    if who == "sheepdog-executor":
                        total, cold, _ = cold_map(args.host, args.calls)
                        ends = cold["create"] + cold["shutdown"]
                        parts = {"create": cold["create"], "map": total - ends, "shutdown": cold["shutdown"]}
                    else:
                        name = f"{remote.job_name}{who[:2]}{repeat}"
                        parts = run_peer(remote, who, installed[who], args.calls, name)
                        total = parts.pop("total")
                except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
                    not_measured[who] = str(exc)[-300:]
                    del seen[who]
                    continue
                seen[who].append(total)
                phases[who].append(parts)
                shown = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
                load = os.getloadavg()[0]
                print(f"  {who:<18} run {repeat + 1}: {total:6.2f} s ({shown}); {busy} busy, load {load:.1f}")
        report(seen, phases, not_measured, args.calls)
    finally:
        remote.close()
    return 0


def report(
    seen: dict[str, list[float]],
    phases: dict[str, list[dict[str, float]]],
    not_measured: dict[str, str],
    calls: int,
) -> None:
    ours = statistics.median(seen["sheepdog-executor"]) if seen.get("sheepdog-executor") else float("nan")
    print()
    print(f"{calls:,} trivial calls from nothing, {WORKERS} workers, median (range) of the runs")
    print(f"{'':<18} {'total':<22} {'create':>7} {'map':>7} {'shutdown':>9}  vs sheepdog-executor")
    for who, totals in seen.items():
        if not totals:
            continue
        middle = statistics.median(totals)
        cells = [statistics.median(p.get(k, 0.0) for p in phases[who]) for k in ("create", "map", "shutdown")]
        span = f"{middle:.1f} s ({min(totals):.1f}-{max(totals):.1f})"
        ratio = "1.0x" if who == "sheepdog-executor" else f"{middle / ours:.1f}x slower"
        print(f"{who:<18} {span:<22} {cells[0]:7.2f} {cells[1]:7.2f} {cells[2]:9.2f}  {ratio}")
    peers = [statistics.median(t) for who, t in seen.items() if who != "sheepdog-executor" and t]
    if peers:
        print(f"the best peer is {min(peers) / ours:.1f}x slower than sheepdog-executor (target: >= 5x)")
    for who, why in not_measured.items():
        print(f"{who}: not measured: {why}")


if __name__ == "__main__":
    raise SystemExit(main())
