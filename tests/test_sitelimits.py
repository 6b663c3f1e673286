"""Site limits and polite use of the scheduler, against a fake scheduler and recorded outputs: caps
on the user's jobs (work waits for room, never fails), commands under a ceiling per minute, removal
of queued tasks in one command. The cells' tests are in test_site_cells.py."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import pytest
from test_jobmanager import FakeScheduler, Rig

from sheepdog_executor.errors import ConfigurationError, SubmitRefused
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.meter import CommandMeter
from sheepdog_executor.options import ExecutorOptions
from sheepdog_executor.scheduler.base import JobStates, TaskState
from sheepdog_executor.scheduler.gridengine import GridEngineScheduler, parse_site_limits, queue_limits
from sheepdog_executor.scheduler.slurm import SlurmScheduler, parse_caps, parse_partition_limits
from sheepdog_executor.sitelimits import Cap, SiteLimits, room


class CappedScheduler(FakeScheduler):
    """A fake scheduler with caps on the user's jobs and jobs of another session in its listing."""

    def __init__(self, *caps: Cap, max_array: int | None = None) -> None:
        super().__init__(max_array)
        self.caps = caps
        self.others: JobStates = {}
        self.refuse = 0  # this many next submits are refused over a per-user limit
        self.most_jobs = self.most_tasks = 0

    def site_limits(self) -> SiteLimits:
        return SiteLimits(self.max_array, self.caps)

    def listing(self) -> JobStates:
        return {**self.poll(list(self.states)), **self.others}

    def submit(self, launch: WorkerLaunch, tasks: int) -> str:
        if self.refuse:
            self.refuse -= 1
            raise SubmitRefused("qsub was refused over a per-user limit: job rejected: Only 2 jobs ...")
        job = super().submit(launch, tasks)
        listed = self.listing()
        self.most_jobs = max(self.most_jobs, len(listed))
        self.most_tasks = max(self.most_tasks, sum(len(t) for t in listed.values()))
        return job


def test_no_more_jobs_than_max_u_jobs_and_the_work_waits_for_room() -> None:
    scheduler = CappedScheduler(Cap("max_u_jobs", 2, "job"), max_array=2)
    rig = Rig(10, max_workers=10, scheduler=scheduler)
    scheduler.others = {"900": {1: TaskState.RUNNING}}  # another session's job: one of the two
    rig.step()
    assert [tasks for _, tasks in scheduler.submitted] == [2]
    assert rig.manager.submitter.snapshot()["waiting"] == "waiting for room: max_u_jobs 2"
    scheduler.others = {}
    rig.step()
    assert [tasks for _, tasks in scheduler.submitted] == [2, 2] and scheduler.most_jobs == 2
    assert not any(f.done() for f in rig.futures)


def test_a_task_cap_counts_other_sessions_tasks() -> None:
    scheduler = CappedScheduler(Cap("MaxSubmitPU of QOS normal", 5, "task"))
    scheduler.others = {"900": {1: TaskState.RUNNING, 2: TaskState.QUEUED}, "901": {0: TaskState.QUEUED}}
    rig = Rig(10, max_workers=10, scheduler=scheduler)
    rig.step()
    assert scheduler.submitted == [("101", 2)]
    assert "MaxSubmitPU of QOS normal 5" in rig.manager.submitter.waiting


def test_a_refused_submission_waits_for_room_and_fails_nothing() -> None:
    scheduler = CappedScheduler(Cap("max_u_jobs", 2, "job"))
    scheduler.refuse = 3  # another session took the room first, three times over
    rig = Rig(2, scheduler=scheduler)
    rig.step()  # refused
    rig.step(advance=0.1)  # woken before the next poll: not tried again
    assert scheduler.refuse == 2
    rig.step()
    rig.step()  # a poll each, and a submission refused each
    assert scheduler.refuse == 0 and scheduler.submitted == [] and rig.dispatcher.broken is None
    assert "refused over a per-user limit" in rig.manager.submitter.waiting
    rig.step()
    assert scheduler.submitted == [("101", 2)] and rig.manager.submitter.waiting == ""
    assert not any(f.done() for f in rig.futures)


def test_shutdown_removes_queued_tasks_in_one_command_per_kind() -> None:
    rig = Rig(300, max_workers=300)
    rig.step()
    assert rig.scheduler.submitted == [("101", 300)]
    for task in range(1, 9):
        rig.scheduler.states["101"][task] = TaskState.RUNNING
    removed: list[Mapping[str, Collection[int]]] = []
    rig.scheduler.cancel_tasks = removed.append  # type: ignore[method-assign]
    for future in rig.futures:
        future.cancel()
    rig.manager._stopping = True
    rig.manager.removal.cancel_queued()
    assert [{job: sorted(tasks) for job, tasks in r.items()} for r in removed] == [
        {"101": list(range(9, 301))}
    ]
    assert rig.scheduler.cancelled_tasks == []


def test_commands_stay_under_the_ceiling_and_removals_never_wait() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    meter = CommandMeter(per_minute=6, clock=lambda: now[0], sleep=sleep)
    for _ in range(6):
        meter.take()
        now[0] += 1.0
    assert slept == []
    meter.take(urgent=True)  # a removal: at once, though the minute is full
    assert slept == [] and meter.snapshot()["last_minute"] == 7
    meter.take()  # waits until fewer than 6 (the removal counted) are left in the last minute
    assert sum(slept) == pytest.approx(55.0) and now[0] == pytest.approx(61.0)
    snapshot = meter.snapshot()
    assert snapshot["total"] == 8 and snapshot["per_minute_ceiling"] == 6
    with pytest.raises(ConfigurationError, match="commands_per_minute must be at least 6"):
        ExecutorOptions(commands_per_minute=1)


def test_room_counts_jobs_and_tasks_once() -> None:
    caps = (Cap("max_u_jobs", 3, "job"), Cap("maxujobs", 10, "task"))
    listed = {"1": {1: "r", 2: "r"}, "2": {0: "q"}}
    ours = {"1": {1: "r", 2: "r", 3: "q"}, "3": {1: "q"}}  # 3: just submitted, not listed yet
    free = room(caps, listed, ours)
    assert (free.jobs, free.tasks, str(free.binding)) == (0, 5, "max_u_jobs 3")


GE_CONF = """global:
execd_spool_dir              /var/spool/gridengine/execd
max_aj_instances             2000
max_aj_tasks                 75000
max_u_jobs                   2
max_jobs                     0
"""


def test_grid_engine_limits_are_read_from_its_configurations() -> None:
    limits = parse_site_limits(GE_CONF, "algorithm default\nmaxujobs 0\n")
    assert limits == SiteLimits(2000, (Cap("max_u_jobs", 2, "job"),))
    limits = parse_site_limits(
        GE_CONF.replace("max_u_jobs                   2", "max_u_jobs 0"), "maxujobs 16\n"
    )
    assert limits.caps == (Cap("maxujobs", 16, "task"),) and limits.describe() == [
        "largest array 2000",
        "maxujobs 16",
    ]
    assert parse_site_limits("", "") == SiteLimits()


def test_the_most_time_and_memory_a_task_may_ask_are_read_from_the_partition_or_the_queues() -> None:
    partitions = (
        "PartitionName=debug Default=YES MaxTime=UNLIMITED DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED\n"
        "PartitionName=short Default=NO MaxTime=00:01:00 MaxMemPerNode=UNLIMITED\n"
        "PartitionName=big Default=NO MaxTime=2-00:00:00 MaxMemPerCPU=4096\n"
    )  # as the Slurm cell's scontrol show partition -o writes them (big: another site's)
    assert parse_partition_limits(partitions, "short") == SiteLimits(max_time=60, source="partition short")
    assert parse_partition_limits(partitions, None) == SiteLimits(source="partition debug")
    big = parse_partition_limits(partitions, "big")
    assert (big.max_time, big.most("mem", 2), big.source) == (172800, 8 * 2**30, "partition big")
    queue = "qname all.q\nh_rt INFINITY\nh_vmem INFINITY\n"
    assert queue_limits(queue) == {"source": "queue all.q", "mem_per_cpu": True}
    two = "qname short.q\nh_rt 1:00:00\nh_vmem 2G\nqname long.q\nh_rt 48:00:00\nh_vmem 4G\n"
    limits = SiteLimits(**queue_limits(two))  # a task may land in either: the larger
    assert (limits.max_time, limits.most("mem", 2), limits.source) == (172800, 8 * 2**30, "the queues")
    assert queue_limits("") == {}


def test_slurm_caps_are_those_of_the_association_and_qos_the_jobs_go_to() -> None:
    assocs = "sheepdog||2|10|normal,sdcap|normal\nother||1|||\nsheepdog|short|7||||\n"
    qoses = "normal|||\nsdcap|3|\n"
    caps = parse_caps("sheepdog\n", assocs, qoses, account=None, partition=None, qos=None)
    assert caps == (Cap("MaxSubmitJobs of association sheepdog", 2, "task"),)
    caps = parse_caps(
        "sheepdog\n", "sheepdog||||normal,sdcap|normal\n", qoses, account=None, partition=None, qos="sdcap"
    )
    assert caps == (Cap("MaxSubmitPU of QOS sdcap", 3, "task"),)
    caps = parse_caps("sheepdog\n", assocs, qoses, account="sheepdog", partition="short", qos=None)
    assert caps == (Cap("MaxSubmitJobs of association sheepdog", 7, "task"),)
    assert parse_caps("", "", "", account=None, partition=None, qos=None) == ()


@pytest.mark.parametrize(
    ("scheduler", "said"),
    [
        (
            GridEngineScheduler,
            "Unable to run job: job rejected: only 2 jobs are allowed per user (current job count: 3)",
        ),
        (
            SlurmScheduler,
            "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: "
            "Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)",
        ),
    ],
)
def test_a_refusal_over_a_per_user_limit_is_recognised(scheduler: type, said: str) -> None:
    assert any(word in said for word in scheduler.refusals)


def test_a_poll_held_back_by_the_ceiling_is_no_pause_and_removals_pass_it() -> None:
    """A poll that waited 50 s for the ceiling must not read as this client being away (which
    would excuse silent workers); leaving the cluster never waits for it."""
    rig = Rig(2)

    def sleep(seconds: float) -> None:
        rig.clock.now += seconds

    meter = rig.scheduler.meter = CommandMeter(per_minute=6, clock=rig.clock, sleep=sleep)
    poll = rig.scheduler.poll
    rig.scheduler.poll = lambda ids: meter.take() or poll(ids)  # type: ignore[method-assign]  # as run() does
    rig.step()  # submits job 101
    for _ in range(6):
        meter.take()  # the minute is full
    before = rig.clock.now
    rig.step(advance=0.5 + rig.manager.poll_interval)
    assert rig.clock.now - before > 50  # the poll waited for the oldest command to leave the minute
    assert rig.manager.away.last_absence == 0 and meter.snapshot()["waited_seconds"] > 50
    for _ in range(5):
        meter.take()  # the minute full again (with the poll)
    now = rig.clock.now
    rig.manager.stop(grace=1.0, timeout=1.0)
    assert rig.clock.now - now < 5 and "101" in rig.scheduler.cancelled
