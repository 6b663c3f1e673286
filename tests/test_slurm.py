"""Slurm: fast tests of the parsing and the sbatch line, then what only Slurm does, on the real one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import read_line, slurm_jobs, spawn, wait_until

from sheepdog_executor import ConfigurationError, SlurmExecutor, WorkerLost, WorkerStartFailed
from sheepdog_executor.cli import main
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch
from sheepdog_executor.resources import Resources
from sheepdog_executor.scheduler.base import TaskState
from sheepdog_executor.scheduler.slurm import (
    SlurmOptions,
    SlurmScheduler,
    parse_max_array_size,
    parse_sacct,
    parse_squeue,
    task_state,
)
from sheepdog_executor.shell import LocalShell

SQUEUE = """\
ARRAY_JOB_ID|ARRAY_TASK_ID|STATE|REASON|NAME|STDOUT
41|1|RUNNING|None|sheepdog|/h/.sheepdog-executor/s1/task-%A-%a.out
41|2|PENDING|Resources|sheepdog|/h/.sheepdog-executor/s1/task-%A-%a.out
42|N/A|PENDING|PartitionTimeLimit|other|/h/slurm-42.out
"""


def test_squeue_lines_and_states() -> None:
    rows = parse_squeue(SQUEUE)
    assert [(job, task, state) for job, task, state, *_ in rows] == [
        ("41", 1, "RUNNING"),
        ("41", 2, "PENDING"),
        ("42", None, "PENDING"),
    ]
    assert task_state("RUNNING", "None") is TaskState.RUNNING
    assert task_state("COMPLETING", "None") is TaskState.RUNNING
    assert task_state("PENDING", "Resources") is TaskState.QUEUED
    assert task_state("PENDING", "Priority") is TaskState.QUEUED
    for reason in (
        "PartitionTimeLimit",
        "ReqNodeNotAvail, UnavailableNodes:n3",
        "QOSMaxWallDurationPerJobLimit",
    ):
        assert task_state("PENDING", reason) is TaskState.ERROR, reason


def test_sacct_record_of_a_task_with_its_steps() -> None:
    text = (
        "7_3|OUT_OF_MEMORY|0:125||00:00:04|n1|50M|01:00:00\n"
        "7_3.batch|OUT_OF_MEMORY|0:125|521548K|00:00:04|n1||\n"
        "7_3.extern|COMPLETED|0:0|1024K|00:00:04|n1||\n"
    )
    record = parse_sacct(text, "7_3")
    assert record["State"] == "OUT_OF_MEMORY" and record["ExitCode"] == "0:125"
    assert record["MaxRSS"] == "509M" and record["ReqMem"] == "50M"
    assert parse_sacct("7_3|RUNNING|0:0||00:00:04|n1|50M|01:00:00\n", "7_3") == {}  # not over yet
    assert parse_sacct("", "7_3") == {}


def test_sacct_says_which_limit_slurm_killed_a_task_for() -> None:
    needs = Resources.parse({"time": "1", "mem": "100M"})
    scheduler = SlurmScheduler(LocalShell(), JobOptions(needs=needs))
    timeout = parse_sacct("7_3|TIMEOUT|0:0||00:01:05|n1|100M|00:01:00\n", "7_3")
    assert scheduler.killed_for(timeout) == (
        "Slurm killed its task over its time limit (time=0:01:00, Timelimit 00:01:00); ask for more time="
    )
    memory = {"State": "OUT_OF_MEMORY", "ReqMem": "100M"}
    assert "over its memory (mem=100M, ReqMem 100M)" in scheduler.killed_for(memory)
    assert scheduler.killed_for({"State": "CANCELLED by 1000"}) == ""
    assert scheduler.killed_for({"State": "FAILED", "ExitCode": "0:9"}) == ""  # no sign of memory
    # without cgroups (OverMemoryKill): SIGKILL, FAILED, and MaxRSS at the request
    killed = {"State": "FAILED", "ExitCode": "0:9", "MaxRSS": "426M", "ReqMem": "100M"}
    assert scheduler.killed_for(killed) == (
        "Slurm killed its task over its memory (mem=100M: MaxRSS 426M reached ReqMem 100M); ask for more mem="
    )
    assert scheduler.killed_for({**killed, "ExitCode": "0:11"}) == ""  # a crash, whatever its memory
    default = SlurmScheduler(LocalShell(), JobOptions()).killed_for(timeout)
    assert "(the partition's default time, Timelimit 00:01:00)" in default


def test_sbatch_line_carries_the_options_quoted() -> None:
    site = SlurmOptions(
        partition="short",
        account="proj x",
        qos="high",
        cpus_per_task=4,
        gres="gpu:1",
        constraint="avx2",
        sbatch_args=("--exclusive",),
    )
    needs = Resources.parse({"time": "60", "mem": "4G"})
    options = JobOptions(job_name="sweep", working_directory="/w", needs=needs)
    scheduler = SlurmScheduler(LocalShell(), options, site=site)
    launch = WorkerLaunch("/h/s1", "http://10.0.0.5:4242")
    line = scheduler.sbatch_command(launch, 8)
    for part in (
        "--array=1-8",
        "--job-name=sweep",
        "--output=/h/s1/task-%A-%a.out",
        "--chdir=/w",
        "--partition=short",
        "'--account=proj x'",
        "--time=1:00:00",
        "--mem=4G",
        "--cpus-per-task=4",
        "--gres=gpu:1",
        "--constraint=avx2",
        "--exclusive",
    ):
        assert part in line.split(" ") or part in line, part
    script = scheduler.render(launch)
    assert 'SHEEPDOG_JOB_ID="$SLURM_ARRAY_JOB_ID"; SHEEPDOG_TASK_ID="$SLURM_ARRAY_TASK_ID"' in script
    assert parse_max_array_size("MaxArraySize            = 1001\n") == 1000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"time": "an hour"}, "time='an hour' is not a time limit: write minutes"),
        ({"cpus_per_task": 0}, "cpus_per_task must be 1 or more"),
        ({"sbatch_args": "--exclusive"}, "sbatch_args must be a list"),
        ({"partition": "short\n#SBATCH --x"}, "partition= contains the control character"),
    ],
)
def test_bad_slurm_options_are_refused_before_connecting(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SlurmExecutor(host="no-such-host.invalid", **options)


# -- on the real Slurm --------------------------------------------------------------------------------
def _task() -> tuple[str, str]:
    return os.environ.get("SHEEPDOG_JOB_ID", ""), os.environ.get("SHEEPDOG_TASK_ID", "")


def _hog(megabytes: int) -> int:
    block = bytearray(megabytes * 2**20)
    time.sleep(30)
    return len(block)


@pytest.fixture
def make_slurm(slurm_cell: str) -> Any:
    made: list[SlurmExecutor] = []

    def make(**options: Any) -> SlurmExecutor:
        options.setdefault("max_workers", 4)
        options.setdefault("poll_interval", 0.5)
        executor = SlurmExecutor(host=slurm_cell, job_name="sd-slurm-test", **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)
        assert not slurm_jobs(set(executor.job_ids)), "jobs left on Slurm after shutdown"


@pytest.mark.cluster
def test_a_job_slurm_can_never_start_fails_its_calls_with_the_reason(
    make_slurm: Callable[..., SlurmExecutor],
) -> None:
    executor = make_slurm(partition="short", time="10")  # longer than the partition's MaxTime
    future = executor.submit(_task)
    with pytest.raises(WorkerStartFailed, match=r"Slurm holds the job in an error state.*Partition"):
        future.result(timeout=60)
    wait_until(lambda: not slurm_jobs(set(executor.job_ids)), 30, "the held job removed")


@pytest.mark.cluster
def test_a_task_over_its_memory_is_lost_with_sacct_saying_why(
    make_slurm: Callable[..., SlurmExecutor],
) -> None:
    executor = make_slurm(mem="100M", max_workers=1, retries=2)
    job, task = executor.submit(_task).result(timeout=60)
    assert job == executor.job_ids[0] and task == "1"
    with pytest.raises(WorkerLost) as caught:
        executor.submit(_hog, 600).result(timeout=120)
    error = caught.value
    assert f"Slurm job {error.job_id}, task 1" in str(error)
    # killed for its memory: signal 9 (OUT_OF_MEMORY where cgroups enforce it), MaxRSS above ReqMem
    assert error.accounting["ExitCode"].endswith(":9") or error.accounting["State"] == "OUT_OF_MEMORY"
    assert error.accounting["ReqMem"] == "100M" and "MaxRSS=" in str(error)
    # said so first, and not run again with retries=2: the same limit would kill it again
    assert "was lost: Slurm killed its task over its memory (mem=100M" in str(error), str(error)
    assert executor.job_ids == [error.job_id]


@pytest.mark.cluster
def test_a_task_over_its_time_limit_is_lost_saying_so_and_not_run_again(
    make_slurm: Callable[..., SlurmExecutor],
) -> None:
    # Slurm counts time limits in whole minutes (time="0:15" would be one minute too) and slurmctld
    # looks for jobs over their limit every 30 s: the kill comes 60 to 90 s after the task started;
    # then a second look and the accounting (seen in CI: 121 s in all, on a busy cell)
    executor = make_slurm(time="1", max_workers=1, retries=1)
    future = executor.submit(time.sleep, 300)
    started = time.monotonic()
    error = future.exception(timeout=200)
    assert isinstance(error, WorkerLost), error
    assert error.accounting["State"] == "TIMEOUT" and error.accounting["Timelimit"] == "00:01:00"
    assert (
        "was lost: Slurm killed its task over its time limit (time=0:01:00, Timelimit 00:01:00); "
        "ask for more time=" in str(error)
    )
    assert f"Slurm job {error.job_id}, task 1" in str(error) and "State=TIMEOUT" in str(error)
    assert time.monotonic() - started < 150  # long before the call's own 300 s
    # retries=1 does not run it again: it would only be killed at the same limit
    assert executor.job_ids == [error.job_id]
    wait_until(lambda: not slurm_jobs(set(executor.job_ids)), 30, "the timed-out job gone from squeue")


@pytest.mark.cluster
def test_joblib_backend_slurm(slurm_cell: str) -> None:
    import joblib

    from sheepdog_executor.integrations import joblib_backend  # noqa: F401 - registers the backends

    options = {"host": slurm_cell, "max_workers": 2, "poll_interval": 0.5, "job_name": "sd-slurm-joblib"}
    with joblib.parallel_config(backend="slurm", **options):
        out = joblib.Parallel()(joblib.delayed(_task)() for _ in range(4))
    assert len(out) == 4 and all(job.isdigit() and task.isdigit() for job, task in out)
    jobs = {job for job, _ in out}
    wait_until(lambda: not slurm_jobs(jobs), 60, "the joblib session's jobs to end")


@pytest.mark.cluster
def test_dask_computes_on_slurm(make_slurm: Callable[..., SlurmExecutor], node_packages: str) -> None:
    import dask

    executor = make_slurm(setup=[node_packages], max_workers=2)
    total = dask.delayed(sum)([dask.delayed(abs)(-i) for i in range(5)])
    assert dask.compute(total, scheduler=executor)[0] == 10


@pytest.mark.cluster
def test_doctor_checks_the_scheduler_the_hosts_table_names(
    slurm_cell: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head node has both qsub and sbatch: the alias's table in the config file says which."""
    config = tmp_path / "config.toml"
    config.write_text(f'[hosts."{slurm_cell}"]\nscheduler = "slurm"\n')
    monkeypatch.setenv("SHEEPDOG_EXECUTOR_CONFIG", str(config))
    code = main(["doctor", slurm_cell, "--timeout", "60"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Slurm: sbatch, squeue, scancel found (slurm-wlm 22.05" in out
    assert f"chosen by scheduler = 'slurm' in [hosts.\"{slurm_cell}\"]" in out
    assert f"all checks passed on Slurm: SlurmExecutor(host='{slurm_cell}') should work" in out


@pytest.mark.cluster
def test_cleanup_removes_the_slurm_job_of_a_killed_client(
    slurm_cell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    child = spawn(
        [sys.executable, str(Path(__file__).with_name("child_map.py")), "raise", slurm_cell, "slurm"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        jobs = set(json.loads(read_line(child, 180, "the child's job ids"))["jobs"])
        assert slurm_jobs(jobs)
    finally:
        child.kill()  # SIGKILL: nothing of the client removes anything
        child.wait()
    code = main(["cleanup", slurm_cell, "--scheduler", "slurm"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(
        rf"removed \S+: job {next(iter(jobs))} \(sheepdog\) and the directory; "
        r"its client \(pid \d+ on this machine\) is gone",
        out,
    )
    wait_until(lambda: not slurm_jobs(jobs), 30, "the dead client's jobs removed")
