"""One vocabulary for what each task needs (``time=``, ``mem=``, ``cpus=``, ``gpus=``) on every
scheduler: the forms users write, the errors for bad ones and for conflicts with a scheduler's own
option, each scheduler's words, and, on the real cells, the job's resources read back from the
scheduler itself."""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
from support import Cluster, wait_until

from sheepdog_executor import (
    ClusterExecutor,
    ConfigurationError,
    GridEngineExecutor,
    LocalExecutor,
    SlurmExecutor,
)
from sheepdog_executor.calls import CallBook, WorkItem
from sheepdog_executor.errors import ResourceConflict, WorkerLost
from sheepdog_executor.escalation import Escalation, Escalator, tried
from sheepdog_executor.jobscript import THREAD_VARIABLES, JobOptions, WorkerLaunch
from sheepdog_executor.options import ExecutorOptions
from sheepdog_executor.resources import Resources, format_memory, format_time, parse_memory, parse_time
from sheepdog_executor.scheduler.gridengine import GridEngineOptions, GridEngineScheduler
from sheepdog_executor.scheduler.slurm import SlurmOptions, SlurmScheduler
from sheepdog_executor.shell import LocalShell, connect
from sheepdog_executor.sitelimits import SiteLimits
from sheepdog_executor.stats import Stats

LAUNCH = WorkerLaunch("/h/s1", "http://10.0.0.5:4242")


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("90", 5400),
        (90, 5400),
        ("2:00:00", 7200),
        ("30:00", 1800),  # MM:SS, as Slurm reads it
        ("1-12:00:00", 129600),
        ("2-0", 172800),
        ("90m", 5400),
        ("2h", 7200),
        ("1d", 86400),
        ("48:00:00", 172800),
        (datetime.timedelta(hours=1, seconds=1), 3601),
    ],
)
def test_time_limits_in_the_forms_users_write(written: Any, seconds: int) -> None:
    assert parse_time(written) == seconds


@pytest.mark.parametrize(
    ("written", "size"),
    [("4G", 4 * 2**30), ("512M", 512 * 2**20), ("1.5GB", 3 * 2**29), ("100MiB", 100 * 2**20), ("2g", 2**31)],
)
def test_memory_in_the_forms_users_write(written: str, size: int) -> None:
    assert parse_memory(written) == size


def test_sizes_and_times_are_written_back_in_both_schedulers_words() -> None:
    assert [format_memory(4 * 2**30), format_memory(1536 * 2**20), format_memory(10**9)] == [
        "4G",
        "1536M",
        "954M",
    ]
    assert [format_time(5400), format_time(172800), format_time(61)] == ["1:30:00", "48:00:00", "0:01:01"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time": "an hour"}, "time='an hour' is not a time limit: write minutes (\"90\"), H:MM:SS"),
        ({"time": "0"}, "time='0' must be longer than 0"),
        ({"mem": "4096"}, 'mem=\'4096\' is not a memory size (a unit is needed: "4096M" or "4096G"?)'),
        ({"mem": "lots"}, "mem='lots' is not a memory size: write a number and a unit, e.g. \"4G\""),
        ({"cpus": 0}, "cpus=0 must be a whole number, 1 or more"),
        ({"gpus": "one"}, "gpus='one' must be a whole number, 0 or more"),
    ],
)
def test_bad_forms_are_refused_before_connecting(options: dict[str, Any], message: str) -> None:
    for executor in (GridEngineExecutor, SlurmExecutor):
        with pytest.raises(ConfigurationError) as caught:
            executor(host="no-such-host.invalid", **options)
        assert message in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("executor", "options", "message"),
    [
        (
            GridEngineExecutor,
            {"time": "1:00:00", "resources": {"h_rt": "2:00:00"}},
            "time='1:00:00' and resources={'h_rt': ...} both ask Grid Engine for each task's time limit; "
            "keep one: time= (the same word on every scheduler) or resources={'h_rt': ...}, not both",
        ),
        (GridEngineExecutor, {"mem": "4G", "resources": ["h_vmem=4G"]}, "resources={'h_vmem': ...}"),
        (
            GridEngineExecutor,
            {"mem": "4G", "memory_resource": "mem_free", "resources": {"mem_free": "1G"}},
            "resources={'mem_free': ...}",
        ),
        (GridEngineExecutor, {"cpus": 2, "parallel_environment": "smp", "slots": 2}, "and slots= both"),
        (SlurmExecutor, {"cpus": 2, "cpus_per_task": 2}, "cpus=2 and cpus_per_task= both ask Slurm"),
        (SlurmExecutor, {"gpus": 1, "gres": "gpu:2"}, "gpus=1 and gres= both ask Slurm for each task's GPUs"),
        (SlurmExecutor, {"time": "60", "sbatch_args": ["--time=2:00:00"]}, "and --time=2:00:00 both"),
        (SlurmExecutor, {"mem": "1G", "sbatch_args": ["--mem-per-cpu=1G"]}, "and --mem-per-cpu=1G both"),
    ],
)
def test_a_resource_asked_twice_is_refused(
    executor: type[ClusterExecutor], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ResourceConflict) as caught:
        executor(host="no-such-host.invalid", **options)
    assert message in str(caught.value), str(caught.value)


def test_grid_engine_words_memory_per_slot_a_pe_for_cpus_and_a_gpu_complex() -> None:
    needs = Resources.parse({"time": "90", "mem": "4G", "cpus": 4, "gpus": 1})
    script = GridEngineScheduler(LocalShell(), JobOptions(needs=needs)).render(LAUNCH, 3)
    for line in ("#$ -l h_rt=1:30:00", "#$ -l h_vmem=1G", "#$ -l gpu=1", "#$ -pe smp 4"):
        assert line in script.splitlines(), line
    site = GridEngineOptions(
        parallel_environment="threads", memory_resource="h_vmem,mem_free", gpu_resource="ngpus"
    )
    script = GridEngineScheduler(LocalShell(), JobOptions(needs=needs), site=site).render(LAUNCH, 3)
    for line in ("#$ -l h_vmem=1G", "#$ -l mem_free=1G", "#$ -l ngpus=1", "#$ -pe threads 4"):
        assert line in script.splitlines(), line
    odd = Resources.parse({"mem": "1G", "cpus": 3})  # rounded up to whole megabytes per slot
    assert "#$ -l h_vmem=342M" in GridEngineScheduler(LocalShell(), JobOptions(needs=odd)).render(LAUNCH, 1)


def test_slurm_words() -> None:
    needs = Resources.parse({"time": "1-00:00:00", "mem": "1536M", "cpus": 4, "gpus": 2})
    line = SlurmScheduler(LocalShell(), JobOptions(needs=needs), site=SlurmOptions(gres="license:1"))
    words = line.sbatch_command(LAUNCH, 3).split(" ")
    for part in ("--time=24:00:00", "--mem=1536M", "--cpus-per-task=4", "--gres=license:1,gpu:2"):
        assert part in words, part


def working_for(seconds: float) -> dict[str, str | None]:
    """Wait (while the test reads the job back from the scheduler), then say what the task set."""
    time.sleep(seconds)
    return {name: os.environ.get(name) for name in ("SHEEPDOG_CPUS", *THREAD_VARIABLES)}


def granted(cluster: Cluster, job: str) -> dict[str, str]:
    """What the scheduler itself says the job asked for: time limit, memory, CPUs."""
    if cluster.scheduler == "gridengine":
        text = cluster.ssh(f"qstat -j {job}").stdout
        hard = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"hard resource_list:\s*(.*)", text).group(1)))
        pe = re.search(r"parallel environment:\s*(\S+) range:\s*(\d+)", text)
        return {"time": hard["h_rt"], "mem per slot": hard["h_vmem"], "cpus": f"{pe.group(1)} {pe.group(2)}"}
    text = cluster.ssh(f"scontrol show job {job}").stdout
    field = dict(re.findall(r"([\w/]+)=(\S+)", text))
    return {"time": field["TimeLimit"], "mem": field["MinMemoryNode"], "cpus": field["CPUs/Task"]}


@pytest.mark.cluster
def test_the_same_script_on_both_schedulers_by_changing_the_class(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    executor = make_any_executor(max_workers=1, time="90", mem="1G", cpus=2)
    future = executor.submit(working_for, 6)
    wait_until(future.running, 120, "the call to start")
    seen = granted(cluster, executor.job_ids[0])
    if cluster.scheduler == "gridengine":  # h_rt in seconds; h_vmem per slot: 1G over 2 slots
        assert seen == {"time": "5400", "mem per slot": "512M", "cpus": "smp 2"}, seen
    else:
        assert seen == {"time": "01:30:00", "mem": "1G", "cpus": "2"}, seen
    assert set(future.result(timeout=60).values()) == {"2"}  # cpus= sets OMP_NUM_THREADS and kin


def resource_set(seconds: float = 0.0) -> tuple[str | None, str]:
    """The resource set and the job of the task that runs the call."""
    time.sleep(seconds)
    return os.environ.get("SHEEPDOG_RESOURCE_SET"), os.environ["SHEEPDOG_JOB_ID"]


def lost_once(marker: str) -> str | None:
    """Kill this call's worker the first time (a lost task), return its resource set the next."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), 9)
    return os.environ.get("SHEEPDOG_RESOURCE_SET")


@pytest.mark.cluster
def test_a_view_with_other_resources_runs_in_arrays_of_its_own(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor], chromium: Callable[..., str]
) -> None:
    executor = make_any_executor(max_workers=2, mem="500M")
    big = executor.with_resources(mem="1G", time="30")
    small = [executor.submit(resource_set, 1) for _ in range(3)]
    slow = big.submit(resource_set, 8)
    mapped = list(big.map(resource_set, [0.5] * 3))
    wait_until(slow.running, 60, "the view's slow call to start")
    rows = executor.status()["resource_sets"]
    assert [row["resources"] for row in rows] == ["mem=500M", "mem=1G,time=0:30:00"], rows
    page = chromium(executor.status_url, "--dump-dom")  # a line per resource set
    assert 'data-set="mem=500M"' in page and 'data-set="mem=1G,time=0:30:00"' in page, page[-3000:]
    big_job = rows[1]["jobs"][0]
    if cluster.scheduler == "gridengine":
        text = cluster.ssh(f"qstat -j {big_job}").stdout
        assert re.search(r"hard resource_list:\s*h_rt=1800,h_vmem=1G\b", text), text
    else:
        text = cluster.ssh(f"scontrol show job {big_job}").stdout
        assert "TimeLimit=00:30:00" in text and "MinMemoryNode=1G" in text, text
    # a worker takes only calls of its own set: each call ran in a task of its set's arrays
    own = {future.result(timeout=120) for future in small}
    other = {*mapped, slow.result(timeout=60)}
    assert {label for label, _ in own} == {"mem=500M"}
    assert {label for label, _ in other} == {"mem=1G,time=0:30:00"}
    assert not {job for _, job in own} & {job for _, job in other}
    assert {job for _, job in own | other} <= set(executor.job_ids)  # each on the books, removed after


@pytest.mark.cluster
def test_a_views_lost_call_is_retried_in_its_own_set_and_shutdown_cancels_its_queue(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    home = cluster.ssh("pwd").stdout.strip()
    marker = f"{home}/sd-lost-once-{os.getpid()}-{time.monotonic_ns()}"
    executor = make_any_executor(max_workers=1, retries=1)
    view = executor.with_resources(mem="600M")
    try:
        assert view.submit(lost_once, marker).result(timeout=180) == "mem=600M"
    finally:
        cluster.ssh(f"rm -f {marker}")
    running = view.submit(resource_set, 3)
    wait_until(running.running, 60, "the view's call to start")
    queued = [view.submit(resource_set) for _ in range(3)]  # its one worker is busy: they wait
    executor.shutdown(wait=True, cancel_futures=True)
    assert running.result(timeout=1)[0] == "mem=600M"
    assert all(future.cancelled() for future in queued)
    assert cluster.jobs(set(executor.job_ids)) == {}  # every set's jobs removed


def test_escalation_doubles_up_to_the_ceiling_and_says_what_was_tried() -> None:
    rule = Escalation.from_options({"escalate": {"mem": 2, "time": 1.5}, "max_mem": "16G"})
    assert rule is not None
    first = Resources.parse({"mem": "4G", "time": "60"})
    steps = [first]
    while (more := rule.next(steps[-1], "mem", first)) is not None:
        steps.append(more)
    assert [needs.words()["mem"] for needs in steps] == ["4G", "8G", "16G"]
    assert rule.next(first, "time", first) == Resources.parse({"mem": "4G", "time": "90"})
    unbounded = Escalation({"time": 2})  # without max_time: three steps above the first request
    assert (
        unbounded.next(Resources.parse({"time": "240"}), "time", Resources.parse({"time": "60"})) is not None
    )
    assert unbounded.next(Resources.parse({"time": "480"}), "time", Resources.parse({"time": "60"})) is None
    assert rule.next(Resources(), "mem", Resources()) is None  # the site's default: nothing to double
    near = Resources.parse({"mem": "7.5G"})  # 15G is within 10 % of the ceiling: the ceiling then
    assert rule.next(near, "mem", near) == Resources.parse({"mem": "16G"})
    assert tried(tuple(steps), "mem") == "mem=4G, then 8G, then 16G: killed over its memory each time"


def test_escalation_asks_no_more_than_the_site_lets_a_task_ask_and_says_so() -> None:
    rule = Escalation({"time": 2, "mem": 2})
    first = Resources.parse({"time": "0:30", "mem": "1G", "cpus": 2})
    partition = SiteLimits(max_time=60, max_mem=3 * 2**30, source="partition short")
    assert rule.next(first, "time", first, partition) == dataclasses.replace(first, time=60)
    at_most = dataclasses.replace(first, time=60)
    assert rule.next(at_most, "time", first, partition) is None  # 120 s would never start there
    assert rule.next(dataclasses.replace(first, mem=2 * 2**30), "mem", first, partition) == (
        dataclasses.replace(first, mem=3 * 2**30)
    )
    per_slot = SiteLimits(max_mem=2**30, mem_per_cpu=True, source="queue all.q")  # h_vmem 1G x 2 slots
    assert rule.next(first, "mem", first, per_slot) == dataclasses.replace(first, mem=2 * 2**30)
    assert rule.next(first, "time", first, SiteLimits()) == dataclasses.replace(first, time=60)
    calls = CallBook(threading.Lock(), Stats(), lambda: None, Resources())
    item = WorkItem(1, Future(), "f", ())
    left = Escalator(rule, calls, lambda needs: None, lambda: None, lambda: partition)([item], "time")
    assert left == [item] and item.bound == ""  # the executor's own set asks no time: nothing to raise
    item.queue = calls.queue(at_most)
    left = Escalator(rule, calls, lambda needs: None, lambda: None, lambda: partition)([item], "time")
    assert left == [item] and item.bound == "partition short allows at most time=0:01:00"


@pytest.mark.parametrize(
    ("escalate", "message"),
    [
        ({"cpus": 2}, "escalate={'cpus': ...}: only mem and time are escalated"),
        ({"mem": 1}, "escalate={'mem': 1}: a factor must be a number above 1"),
        ([2], "escalate=[2] must be a table of factors"),
    ],
)
def test_bad_escalation_is_refused_before_connecting(escalate: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        SlurmExecutor(host="no-such-host.invalid", escalate=escalate)
    assert message in str(caught.value), str(caught.value)


def hold(megabytes: int, seconds: float) -> int:
    """Hold this much memory (touched) for this long."""
    block = bytearray(megabytes * 2**20)
    time.sleep(seconds)
    return len(block) // 2**20


@pytest.mark.cluster
def test_a_call_killed_over_its_memory_runs_again_with_more_on_slurm(
    make_any_executor: Callable[..., ClusterExecutor], cluster: Cluster
) -> None:
    if cluster.scheduler != "slurm":
        pytest.skip(
            "Grid Engine's h_vmem fails an allocation (MemoryError), it does not kill: see the README"
        )
    executor = make_any_executor(max_workers=2, mem="100M", escalate={"mem": 2}, max_mem="200M")
    fits_twice = executor.submit(hold, 120, 30)  # over 100M, within 200M
    never_fits = executor.submit(hold, 300, 30)  # over both
    assert fits_twice.result(timeout=300) == 120
    error = never_fits.exception(timeout=300)
    assert isinstance(error, WorkerLost), error
    headline = str(error).splitlines()[0]
    assert (
        "mem=100M, then 200M: killed over its memory each time; Slurm killed its task over its memory "
        "(mem=200M: MaxRSS" in headline
    ), headline
    assert [row["resources"] for row in executor.status()["resource_sets"]] == ["mem=100M", "mem=200M"]


def out_of_memory_at(megabytes: int) -> int:
    """Allocate this much (touched); under an address-space limit it raises MemoryError."""
    return len(bytearray(megabytes * 2**20)) // 2**20


@pytest.mark.cluster
def test_a_call_out_of_its_memory_runs_again_with_more_on_grid_engine(
    make_any_executor: Callable[..., ClusterExecutor], cluster: Cluster
) -> None:
    if cluster.scheduler != "gridengine":
        pytest.skip("Slurm kills a task over its memory: the kill is escalated (the test above)")
    executor = make_any_executor(max_workers=2, mem="500M", escalate={"mem": 2}, max_mem="1G")
    fits_twice = executor.submit(out_of_memory_at, 600)  # over h_vmem=500M, within 1G
    never_fits = executor.submit(out_of_memory_at, 1500)
    assert fits_twice.result(timeout=180) == 600
    error = never_fits.exception(timeout=180)
    assert isinstance(error, MemoryError), error
    assert "sheepdog: mem=500M, then 1G: out of its memory each time" in getattr(error, "__notes__", []), (
        error
    )
    assert [row["resources"] for row in executor.status()["resource_sets"]] == ["mem=500M", "mem=1G"]


@pytest.mark.cluster
def test_a_call_killed_over_its_time_limit_runs_again_with_more_on_grid_engine(
    make_any_executor: Callable[..., ClusterExecutor], cluster: Cluster
) -> None:
    if cluster.scheduler != "gridengine":
        pytest.skip("Slurm counts limits in whole minutes, checked every 30 s: its memory case is tested")
    executor = make_any_executor(max_workers=1, time="0:20", escalate={"time": 2}, max_time="0:40")
    assert executor.submit(hold, 1, 30).result(timeout=300) == 1  # over 20 s, within 40 s
    error = executor.submit(hold, 1, 60).exception(timeout=300)  # over both
    assert isinstance(error, WorkerLost), error
    headline = str(error).splitlines()[0]
    assert (
        "time=0:00:20, then 0:00:40: killed over its time limit each time; Grid Engine killed its task "
        "over its time limit (h_rt=0:00:40" in headline
    ), headline


def test_which_limit_the_scheduler_killed_a_task_over() -> None:
    needs = Resources.parse({"mem": "100M", "time": "1"})
    slurm = SlurmScheduler(LocalShell(), JobOptions(needs=needs))
    assert slurm.killed_over({"State": "TIMEOUT", "Timelimit": "00:01:00"}) == "time"
    assert slurm.killed_over({"State": "OUT_OF_MEMORY", "ReqMem": "100M"}) == "mem"
    assert (
        slurm.killed_over({"State": "FAILED", "ExitCode": "0:9", "MaxRSS": "426M", "ReqMem": "100M"}) == "mem"
    )
    assert slurm.killed_over({"State": "FAILED", "ExitCode": "0:9", "MaxRSS": "20M", "ReqMem": "100M"}) == ""
    grid = GridEngineScheduler(LocalShell(), JobOptions(needs=Resources.parse({"mem": "1G", "time": "0:20"})))
    h_rt = "37  : qmaster enforced h_rt, h_cpu, or h_vmem limit"
    assert grid.killed_over({"failed": h_rt, "ru_wallclock": "21.0s", "maxvmem": "100.0MB"}) == "time"
    assert grid.killed_over({"failed": h_rt, "ru_wallclock": "3.0s", "maxvmem": "1020.0MB"}) == "mem"
    assert grid.killed_over({"failed": "0", "exit_status": "137", "ru_wallclock": "21.0s"}) == ""


def test_a_view_runs_on_local_processes_too() -> None:
    with LocalExecutor(max_workers=1, status_page=False) as executor:
        view = executor.with_resources(mem="1G", cpus=2)
        assert view.submit(resource_set).result(timeout=60)[0] == "cpus=2,mem=1G"
        assert executor.submit(resource_set).result(timeout=60)[0] == ""
        assert [row["resources"] for row in executor.status()["resource_sets"]] == [
            "the site's defaults",
            "cpus=2,mem=1G",
        ]


@pytest.mark.cluster
def test_the_cells_say_the_most_time_a_task_may_ask_which_escalation_never_passes(
    cell: str, slurm_cell: str
) -> None:
    """The Slurm cell's partition short has MaxTime=00:01:00; its default partition and the Grid
    Engine cell's all.q have no limit (escalation then stops at its own ceiling)."""
    for host, scheduler, site, most in (
        (slurm_cell, SlurmScheduler, SlurmOptions(partition="short"), (60, "partition short")),
        (slurm_cell, SlurmScheduler, SlurmOptions(), (None, "partition debug")),
        (cell, GridEngineScheduler, GridEngineOptions(), (None, "queue all.q")),
    ):
        shell = connect(host, ExecutorOptions(host=host))
        try:
            limits = scheduler(shell, JobOptions(), site=site).site_limits()  # type: ignore[arg-type]
        finally:
            shell.close()
        assert (limits.max_time, limits.source) == most
