"""Run on the cell's head node as its user (``bench_peers.py`` sends it): one peer of
sheepdog-executor maps ``CALLS`` trivial calls over ``WORKERS`` Grid Engine workers, from nothing,
and prints one JSON line of timings.

    PYTHONPATH=<peer packages> python3 peers_on_head.py dask|parsl|ipyparallel CALLS WORKERS JOB_NAME LOGS

Every job it submits is called ``JOB_NAME``; the caller removes only jobs of that name. The peer's
packages must be importable by ``python3`` with this ``PYTHONPATH``, on the head node and the nodes.
Timing starts after the imports (as the executor's does: its interpreter is running already).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def f(x: int) -> int:
    return x + 1


def environment() -> list[str]:
    """Shell lines giving a job the peer's packages (and their scripts, which parsl runs by name)."""
    packages = os.environ["PYTHONPATH"]
    return [f"export PYTHONPATH={packages}", f"export PATH={packages}/bin:$PATH"]


def run_dask(calls: int, workers: int, name: str, logs: str) -> dict[str, float]:
    from dask_jobqueue import SGECluster
    from distributed import Client

    start = time.perf_counter()
    cluster = SGECluster(
        cores=1,
        processes=1,
        memory="1GB",
        job_name=name,
        python=sys.executable,
        job_script_prologue=environment(),
        log_directory=logs,
        scheduler_options={"host": "127.0.0.1", "dashboard_address": None},
        interface="lo",
    )
    client = Client(cluster)
    cluster.scale(workers)
    created = time.perf_counter()
    results = client.gather(client.map(f, range(calls)))
    mapped = time.perf_counter()
    client.close()
    cluster.close()
    end = time.perf_counter()
    assert results == [x + 1 for x in range(calls)], "wrong results"
    return {"create": created - start, "map": mapped - created, "shutdown": end - mapped}


def run_parsl(calls: int, workers: int, name: str, logs: str) -> dict[str, float]:
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.launchers import SingleNodeLauncher
    from parsl.providers import GridEngineProvider

    start = time.perf_counter()
    provider = GridEngineProvider(
        launcher=SingleNodeLauncher(),
        init_blocks=workers,
        min_blocks=0,
        max_blocks=workers,
        nodes_per_block=1,
        walltime="00:30:00",
        worker_init="; ".join(environment()),
        scheduler_options=f"#$ -N {name}",
    )
    executor = HighThroughputExecutor(
        label="sge", address="127.0.0.1", max_workers_per_node=1, provider=provider, worker_debug=False
    )
    dfk = parsl.load(Config(executors=[executor], run_dir=logs, strategy="none"))
    app = parsl.python_app(f)
    created = time.perf_counter()
    futures = [app(x) for x in range(calls)]
    results = [future.result() for future in futures]
    mapped = time.perf_counter()
    dfk.cleanup()
    end = time.perf_counter()
    assert results == [x + 1 for x in range(calls)], "wrong results"
    return {"create": created - start, "map": mapped - created, "shutdown": end - mapped}


def run_ipyparallel(calls: int, workers: int, name: str, logs: str) -> dict[str, float]:
    import ipyparallel as ipp
    from traitlets.config import Config

    config = Config()
    # the engines as one SGE array job, named ``name``, with this environment (-V: PYTHONPATH)
    config.SGEEngineSetLauncher.batch_template = (
        f"#$ -V\n#$ -S /bin/sh\n#$ -N {name}\n#$ -t 1-{{n}}\n#$ -j y\n#$ -o {logs}\n{{program_and_args}}\n"
    )
    start = time.perf_counter()
    cluster = ipp.Cluster(
        n=workers,
        engines="sge",
        controller_ip="127.0.0.1",
        profile_dir=f"{logs}/profile",
        cluster_id=name,
        config=config,
        log_level=40,
    )
    client = cluster.start_and_connect_sync()
    created = time.perf_counter()
    results = client.load_balanced_view().map_sync(f, range(calls))
    mapped = time.perf_counter()
    client.close()
    cluster.stop_cluster_sync()
    end = time.perf_counter()
    assert list(results) == [x + 1 for x in range(calls)], "wrong results"
    return {"create": created - start, "map": mapped - created, "shutdown": end - mapped}


def main() -> None:
    peer, calls, workers, name, logs = sys.argv[1:6]
    os.makedirs(logs, exist_ok=True)
    os.environ["PATH"] = f"{os.environ['PYTHONPATH']}/bin:{os.environ['PATH']}"
    runs: dict[str, Any] = {"dask": run_dask, "parsl": run_parsl, "ipyparallel": run_ipyparallel}
    phases = runs[peer](int(calls), int(workers), name, logs)
    print(json.dumps({"total": sum(phases.values()), **phases}))


if __name__ == "__main__":
    main()
