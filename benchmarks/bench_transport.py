"""Transport: threads of the client and of the head node's relay, and the throughput of signed
requests through the relay and the tunnel, with 10, 100 and 300 connections at once.

An executor with ``callback="tunnel"`` runs here (the client); on the head node, over ``ssh``, a load
script opens N keep-alive connections through the relay as a worker does (TLS with the certificate
pinned, every request signed: ``remote/worker.py``'s ``Channel``) and sends signed heartbeats on all
of them at once (one thread each, in the load script) for ``--seconds``. Meanwhile the client's
threads (``/proc/self/task``) and the relay's (``/proc/PID/task`` on the head node) are counted.

Run: ``python benchmarks/bench_transport.py [--host fear] [--connections 10,100,300] [--seconds 5]``.
To measure another checkout, put it first on ``PYTHONPATH``; the first line says which was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()

#: On the head node: N connections, one signed heartbeat each, ``open N``; then on a line of stdin,
#: heartbeats on all at once for SECONDS, and one JSON line of figures.
LOAD = """
import json, sys, threading, time
bundle, url, secret_file, fingerprint, n, seconds = sys.argv[1:7]
sys.path.insert(0, bundle)
from sheepdog_executor.remote.worker import Channel
secret = open(secret_file, "rb").read().strip()
channels = []
for _ in range(int(n)):
    channel = Channel(url, secret, fingerprint or None)
    try:
        channel.call("/heartbeat", {"worker": "bench"}, attempts=3)
    except Exception:
        continue
    channels.append(channel)
print("open", len(channels), flush=True)
sys.stdin.readline()
done, counts, errors = [], [], []
end = time.monotonic() + float(seconds)

def load(channel):
    count = 0
    try:
        while time.monotonic() < end:
            channel.call("/heartbeat", {"worker": "bench"}, attempts=1)
            count += 1
    except Exception as exc:
        errors.append(repr(exc))
    counts.append(count)

start = time.monotonic()
threads = [threading.Thread(target=load, args=(c,)) for c in channels]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
elapsed = time.monotonic() - start
print(json.dumps({"requests": sum(counts), "seconds": elapsed, "errors": errors[:3]}), flush=True)
"""


def on_head(host: str, command: str) -> str:
    """What ``command`` prints on the head node."""
    done = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", host, command], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def tasks(pid: int, host: str | None = None) -> int:
    """The threads of process ``pid`` here, or on ``host``."""
    if host is None:
        return len(os.listdir(f"/proc/{pid}/task"))
    return int(on_head(host, f"ls /proc/{int(pid)}/task | wc -l").strip())


def relay_pid(host: str, port: int) -> int:
    """The pid of the process listening on ``port`` of the head node (ours: ss shows it)."""
    out = on_head(host, f"ss -ltnpH 'sport = :{port}'")
    for part in out.replace(",", " ").split():
        if part.startswith("pid="):
            return int(part[4:])
    raise RuntimeError(f"no process listens on port {port} of {host}: {out!r}")


def measure(host: str, launch: object, relay: int, n: int, seconds: float) -> dict[str, float]:
    args = [getattr(launch, name) or "" for name in ("bundle_path", "url", "secret_path", "fingerprint")]
    command = "exec python3 -c " + " ".join(map(shlex.quote, [LOAD, *args, str(n), str(seconds)]))
    load = subprocess.Popen(
        ["ssh", "-o", "BatchMode=yes", host, command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert load.stdin is not None and load.stdout is not None
    try:
        said = load.stdout.readline().split()
        if said[:1] != ["open"]:
            raise RuntimeError(f"the load script said {said}")
        load.stdin.write("go\n")
        load.stdin.flush()
        time.sleep(seconds / 2)
        client, head = tasks(os.getpid()), tasks(relay, host)
        figures = json.loads(load.stdout.readline())
    finally:
        load.kill()
        load.wait(timeout=30)
    return {
        "client_threads": client,
        "relay_threads": head,
        "requests_per_s": figures["requests"] / figures["seconds"],
        "errors": len(figures["errors"]),
        "opened": int(said[1]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="fear")
    parser.add_argument("--connections", default="10,100,300")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from bench_map import package_revision  # noqa: E402 - the same header as bench_map

    from sheepdog_executor import GridEngineExecutor

    print(f"sheepdog_executor: {package_revision()}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    with GridEngineExecutor(
        host=args.host, callback="tunnel", max_workers=1, idle_timeout=300, progress=False
    ) as executor:
        assert list(executor.map(abs, range(-10, 0))) == list(range(10, 0, -1))
        session = executor._session
        relay = relay_pid(args.host, session.routes[-1][2])
        print(f"idle: client threads {tasks(os.getpid())}, relay threads {tasks(relay, args.host)}")
        print(f"{'connections':>11} {'client threads':>14} {'relay threads':>13} {'signed requests/s':>17}")
        for n in map(int, args.connections.split(",")):
            figures = measure(args.host, session.launch, relay, n, args.seconds)
            errors = f"  ({figures['errors']:.0f} connections failed)" if figures["errors"] else ""
            if figures["opened"] < n:
                errors += f"  (only {figures['opened']:.0f} of {n} could be opened)"
            print(
                f"{n:>11} {figures['client_threads']:>14} {figures['relay_threads']:>13} "
                f"{figures['requests_per_s']:>17,.0f}{errors}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
