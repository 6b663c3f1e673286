"""Workers of a client that died: gone from the cluster within ``disconnect_tolerance`` + 30 s.

A worker counts the time since it last reached its client; past the tolerance it ends its call and
exits (``remote/reach.py``), and a task that starts after its client died gives up within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from support import our_jobs, read_line, spawn, wait_until

cluster = pytest.mark.cluster

TOLERANCE = 10.0

CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from sheepdog_executor import GridEngineExecutor

    def slow(seconds):
        import time
        time.sleep(seconds)

    executor = GridEngineExecutor(
        host=sys.argv[1], max_workers=2, poll_interval=0.5, job_name=sys.argv[2],
        disconnect_tolerance=float(sys.argv[3]),
        qsub_args=["-tc", "1"],  # one task runs (a 600 s call), the other waits in the queue
    )
    results = executor.map(slow, [600, 600])
    while not executor.status()["workers"]:
        time.sleep(0.2)
    print(json.dumps({"jobs": executor.job_ids}), flush=True)
    time.sleep(3600)
    """
)


@cluster
def test_a_dead_clients_jobs_leave_the_cluster_within_the_tolerance(cell: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    name = f"sdgone-{uuid.uuid4().hex[:6]}"
    clients = {
        sig: spawn(
            [sys.executable, "-c", CLIENT, cell, name, str(TOLERANCE)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for sig in (signal.SIGKILL, signal.SIGTERM)
    }
    jobs: set[str] = set()
    try:
        for client in clients.values():
            jobs |= set(json.loads(read_line(client, 180, "the client's job ids"))["jobs"])
        states = our_jobs(jobs)
        assert any("qw" in s for rows in states.values() for s in rows), states  # a task still queued
        for sig, client in clients.items():
            client.send_signal(sig)
        for client in clients.values():
            client.wait(timeout=30)
        killed = time.monotonic()
        wait_until(lambda: not our_jobs(jobs), TOLERANCE + 30, "a dead client's tasks gone from qstat")
        print(f"gone {time.monotonic() - killed:.1f} s after the clients died")
    finally:
        for client in clients.values():
            client.kill()
            client.wait()
        left = our_jobs(jobs)
        if left:
            subprocess.run(["ssh", "-o", "BatchMode=yes", cell, "qdel " + " ".join(left)], check=False)


AWAY_CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from sheepdog_executor import GridEngineExecutor

    def slow(seconds):
        import time
        time.sleep(seconds)
        return seconds

    executor = GridEngineExecutor(
        host=sys.argv[1], max_workers=2, poll_interval=0.5, job_name=sys.argv[2],
        disconnect_tolerance=float(sys.argv[3]), retries=int(sys.argv[4]),
    )
    futures = [executor.submit(slow, 20) for _ in range(2)]
    while len(executor.status()["workers"]) < 2:
        time.sleep(0.2)
    print("running", flush=True)
    report = {}
    for future in futures:
        try:
            report.setdefault("results", []).append(future.result(timeout=300))
        except Exception as exc:
            report.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
    executor.shutdown()
    print(json.dumps(report), flush=True)
    """
)


@cluster
def test_a_client_away_longer_than_the_tolerance_gets_its_calls_rerun_or_told_why(cell: str) -> None:
    """Suspended for 3 x the tolerance: the workers gave up; with retries the calls run again, without
    them they fail with WorkerLost saying how long the client was unreachable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    name = f"sdaway-{uuid.uuid4().hex[:6]}"
    clients = {
        retries: spawn(
            [sys.executable, "-c", AWAY_CLIENT, cell, name, str(TOLERANCE), str(retries)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for retries in (0, 1)
    }
    try:
        for client in clients.values():
            said = read_line(client, 180, "the client's word that its calls run").strip()
            assert said == "running", said
        for client in clients.values():
            client.send_signal(signal.SIGSTOP)
        time.sleep(3 * TOLERANCE)  # the suspension itself
        for client in clients.values():
            client.send_signal(signal.SIGCONT)
        reports = {}
        for retries, client in clients.items():
            out, err = client.communicate(timeout=300)
            reports[retries] = json.loads(out.splitlines()[-1])
    finally:
        for client in clients.values():
            client.send_signal(signal.SIGCONT)
            client.kill()
            client.wait()
    assert reports[1] == {"results": [20, 20]}, reports[1]
    errors = reports[0].get("errors", [])
    assert len(errors) == 2 and all(e.startswith("WorkerLost") for e in errors), reports[0]
    assert all("this client was unreachable for" in e for e in errors), errors
