"""A call's time limit is the call's, not its task's: a worker takes no call that would not finish
before its task's time ends (it retires and a fresh task takes the rest), a call the task's time
ran out under runs again; memory kills and a MemoryError under the task's limit say so."""

from __future__ import annotations

import os
import pickle
import subprocess
import time
from collections.abc import Callable

import pytest
from support import Cluster

from sheepdog_executor import ClusterExecutor, GridEngineExecutor, WorkerLost
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch
from sheepdog_executor.remote import protocol
from sheepdog_executor.remote.budget import RESERVE_SECONDS, SAFETY, Budget
from sheepdog_executor.remote.worker import Capture, run_items
from sheepdog_executor.resources import Resources
from sheepdog_executor.scheduler import GridEngineOptions, GridEngineScheduler, SlurmScheduler
from sheepdog_executor.scheduler.gridengine import parse_qacct, queue_times
from sheepdog_executor.scheduler.gridengine import parse_time as grid_engine_time
from sheepdog_executor.shell import LocalShell

LAUNCH = WorkerLaunch("/home/u/.sheepdog-executor/s1", "http://127.0.0.1:1")


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


# -- the worker's budget -------------------------------------------------------------------------
def test_a_call_is_taken_only_when_its_functions_longest_run_fits_in_the_time_left() -> None:
    budget = Budget(time.time() + 20)
    assert budget.fits("f")  # never run here: nothing to judge it by
    budget.ran("f", 10.0)
    assert budget.fits("f")  # 10 s x SAFETY + RESERVE_SECONDS < 20 s
    budget.ran("f", 5.0)  # the longest run counts
    budget.ran("f", (20 - RESERVE_SECONDS) / SAFETY + 0.5)
    assert not budget.fits("f") and budget.fits("g")
    assert Budget(None).fits("f") and Budget(None).left() is None
    past = Budget(time.time() - 5)  # a deadline already past is a wrong clock, not a reason to stop
    past.ran("f", 100.0)
    assert past.fits("f") and past.left() is None
    assert Budget.from_environment({"SHEEPDOG_DEADLINE": "x"}).left() is None
    left = Budget.from_environment({"SHEEPDOG_DEADLINE": str(time.time() + 60)}).left()
    assert left is not None and 58 < left <= 60


def test_the_worker_stops_before_a_call_that_would_not_end_in_time() -> None:
    items = [protocol.Item(i, 1, "nap", pickle.dumps(((0.2,), {}))).wire() for i in range(1, 4)]
    budget = Budget(time.time() + 0.2 * SAFETY + RESERVE_SECONDS + 0.1)
    results = run_items(items, {"nap": nap}, Capture(), budget)
    assert [r.item for r in results] == [1]  # the rest go back to the client unrun


def test_the_worker_stops_before_a_call_that_would_take_it_over_its_memory_limit() -> None:
    budget = Budget(None, memory_limit=10**12)
    assert budget.fits("grow")
    budget.ran("grow", 0.1)
    now = budget.memory()[0]
    assert now > 0  # /proc/self/status read
    budget.memory_limit = int(now / 0.9)  # no room above what it holds now
    budget._rise["grow"] = 50 * 2**20  # a call of it raised the memory by 50 MB
    assert not budget.fits("grow") and budget.fits("other")
    limited = Budget.from_environment({"SHEEPDOG_MEMORY_LIMIT": "209715200 vmem"})
    assert limited.memory_limit == 200 * 2**20 and limited.memory()[0] > now  # its address space
    assert Budget.from_environment({"SHEEPDOG_MEMORY_LIMIT": "0 rss"}).memory_limit is None


# -- what each scheduler tells the worker, and how its accounting reads ------------------------
def test_time_limits_are_read_in_each_schedulers_words() -> None:
    assert [grid_engine_time(v) for v in ("15", "1:30", "0:0:5", "2:00:00", "INFINITY")] == [
        15,
        90,
        5,
        7200,
        None,
    ]


def test_the_job_script_exports_when_the_tasks_time_ends() -> None:
    site = GridEngineOptions(resources={"h_rt": "0:1:0"})
    grid = GridEngineScheduler(LocalShell(), JobOptions(), site=site)
    script = grid.render(LAUNCH, 2)
    assert 'SHEEPDOG_DEADLINE="$(( $(date +%s) + 60 ))"; export SHEEPDOG_DEADLINE' in script
    assert "SHEEPDOG_MEMORY_ADVICE='raise h_vmem in resources='" in script
    assert "SHEEPDOG_MEMORY_LIMIT" not in script
    site = GridEngineOptions(resources={"h_vmem": "400M"}, parallel_environment="smp", slots=2)
    script = GridEngineScheduler(LocalShell(), JobOptions(), site=site).render(LAUNCH, 1)
    assert f'SHEEPDOG_MEMORY_LIMIT="{800 * 2**20} vmem"' in script  # h_vmem is per slot
    assert "SHEEPDOG_DEADLINE" not in GridEngineScheduler(LocalShell(), JobOptions()).render(LAUNCH, 2)
    slurm = SlurmScheduler(LocalShell(), JobOptions(needs=Resources(time=120))).render(LAUNCH)
    assert 'SHEEPDOG_DEADLINE="${SLURM_JOB_END_TIME:-$(( $(date +%s) + 120 ))}"' in slurm
    # no time= (the partition's default): squeue's end time, once per task
    default = SlurmScheduler(LocalShell(), JobOptions()).render(LAUNCH)
    assert 'squeue -h -j "$SLURM_JOB_ID" -o %e' in default


def test_grid_engine_accounting_says_which_limit_killed_a_task() -> None:
    site = GridEngineOptions(resources={"h_rt": "15", "h_vmem": "300M"})
    grid = GridEngineScheduler(LocalShell(), JobOptions(), site=site)
    failed = "failed       37  : qmaster enforced h_rt, h_cpu, or h_vmem limit\nexit_status  137\n"
    # records seen on the cell: h_rt=15 (sleep 200), and h_vmem=300M (two processes of 200 MB)
    over_time = parse_qacct(failed + "ru_wallclock 16s\nmaxvmem      3.539MB\n")
    over_memory = parse_qacct(failed + "ru_wallclock 1s\nmaxvmem      418.051MB\n")
    assert grid.limit_hit(over_time) == "time" and grid.limit_hit(over_memory) == "memory"
    assert grid.killed_for(over_time) == (
        "Grid Engine killed its task over its time limit (h_rt=15: ru_wallclock 16s; qacct failed 37); "
        "raise h_rt in resources="
    )
    assert grid.killed_for(over_memory) == (
        "Grid Engine killed its task over its memory (h_vmem=300M: maxvmem 418.051MB; qacct failed 37); "
        "raise h_vmem in resources="
    )
    assert grid.limit_hit({"failed": "0", "maxvmem": "418MB"}) == ""
    # a SIGKILL at the memory asked for (cgroups, the OOM killer) reads as a memory kill too
    grid = GridEngineScheduler(
        LocalShell(), JobOptions(), site=GridEngineOptions(resources={"mem_free": "1G"})
    )
    oom = {"failed": "0", "exit_status": "137", "maxvmem": "1.0GB"}
    assert grid.killed_for(oom) == (
        "Grid Engine killed its task over its memory (mem_free=1G: maxvmem 1.0GB; killed by SIGKILL); "
        "raise mem_free in resources="
    )
    assert (
        grid.limit_hit({**oom, "maxvmem": "200MB"}) == ""
        and grid.limit_hit({**oom, "exit_status": "1"}) == ""
    )
    slurm = SlurmScheduler(LocalShell(), JobOptions(needs=Resources(time=60, mem=100 * 2**20)))
    assert slurm.limit_hit({"State": "TIMEOUT"}) == "time"
    killed = {"State": "FAILED", "ExitCode": "0:9", "ReqMem": "100M"}
    assert slurm.limit_hit({**killed, "MaxRSS": "426M"}) == "memory"
    assert slurm.limit_hit({**killed, "MaxRSS": "10M"}) == ""


QCONF_SQ = """qname                 all.q
hostlist              @allhosts
h_rt                  0:0:40
qname                 long.q
h_rt                  INFINITY
qname                 mixed.q
h_rt                  1:00:00,[@short=0:10:00]
qname                 night-q
h_rt                  600
"""


def test_without_h_rt_a_grid_engine_task_takes_the_time_limit_of_the_queue_it_landed_in() -> None:
    """A site's queue may bound every task (its h_rt) when the job asks for none: the worker must
    know it, else its last call is killed under it. The queues' limits come with the site's, by
    name; the task picks its own from $QUEUE."""
    assert queue_times(QCONF_SQ) == {"all.q": 40.0, "night-q": 600.0}
    grid = GridEngineScheduler(LocalShell(), JobOptions())
    assert "SHEEPDOG_DEADLINE" not in grid.render(LAUNCH, 1)  # not known yet: none
    copy = grid.with_python("/opt/python3")  # made before the limits came: it learns them too
    grid.queue_times.update(queue_times(QCONF_SQ))
    script = copy.render(LAUNCH, 1)
    word = script.split("SHEEPDOG_DEADLINE=", 1)[1].split("; export", 1)[0]
    for queue, seconds in (("all.q", 40), ("night-q", 600), ("long.q", None)):
        shown = subprocess.run(
            ["sh", "-c", f'SHEEPDOG_DEADLINE={word}; echo "$SHEEPDOG_DEADLINE $(date +%s)"'],
            env={"QUEUE": queue, "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        if seconds is None:
            assert len(shown) == 1, shown  # no deadline: the worker takes any call
        else:
            assert int(shown[0]) - int(shown[1]) in (seconds, seconds - 1), (queue, shown)
    # asked: the h_rt asked for, whatever the queue
    asked = GridEngineScheduler(LocalShell(), JobOptions(needs=Resources(time=90)))
    asked.queue_times.update(queue_times(QCONF_SQ))
    assert 'SHEEPDOG_DEADLINE="$(( $(date +%s) + 90 ))"' in asked.render(LAUNCH, 1)
    # a kill at the queue's limit reads as one, with the queue's name
    killed = parse_qacct(
        "qname        all.q\nfailed       37  : qmaster enforced h_rt, h_cpu, or h_vmem limit\n"
        "exit_status  137\nru_wallclock 41s\nmaxvmem      3.5MB\n"
    )
    assert copy.limit_hit(killed) == "time"
    assert copy.killed_for(killed) == (
        "Grid Engine killed its task over the time limit of queue all.q (h_rt=0:00:40: ru_wallclock "
        "41s; qacct failed 37); a call that long needs a queue with a longer h_rt (queue=)"
    )


# -- on the cells --------------------------------------------------------------------------------
#: A limit, a call length that fits it once but not twice in one task, and how many calls: before,
#: a worker's second call was killed with its task (Grid Engine enforces h_rt within a second here;
#: Slurm counts whole minutes and looks every 30 s, so its second call must outlast 90 s).
FITS_ONCE = {"gridengine": ({"resources": {"h_rt": "25"}}, 15.0), "slurm": ({"time": "1"}, 48.0)}


def time_left() -> float:
    import os
    import time

    return float(os.environ["SHEEPDOG_DEADLINE"]) - time.time()


#: Options with a time limit of 60 s, said in each scheduler's words or left to its default.
SIXTY_SECONDS = {
    "gridengine": [{"resources": {"h_rt": "0:1:0"}}],
    # on the test cluster's partition "short" (MaxTime 1:00) without time=: squeue's end time
    "slurm": [{"time": "1"}, {"partition": "short"}],
}


@pytest.mark.cluster
def test_the_worker_knows_when_its_tasks_time_ends(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    for options in SIXTY_SECONDS[cluster.scheduler]:
        left = make_any_executor(max_workers=1, **options).submit(time_left).result(timeout=60)
        assert 40 < left <= 60, (options, left)


@pytest.mark.cluster
def test_calls_that_each_fit_the_time_limit_all_finish(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    options, seconds = FITS_ONCE[cluster.scheduler]
    executor = make_any_executor(max_workers=2, retries=0, **options)
    assert list(executor.map(nap, [seconds] * 4, timeout=300)) == [seconds] * 4
    assert len(executor.job_ids) >= 2  # the workers retired; fresh tasks ran the other calls


@pytest.mark.cluster
def test_a_call_the_tasks_time_ran_out_under_runs_again_in_a_new_task(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    # two short calls, then a long one the worker expected to be short: h_rt kills the task under
    # it; it had less than the task's time, so it runs again, first in a fresh task, and fits (Grid
    # Engine ends a task 0 to 2 s after its h_rt here: a few seconds of margin each way)
    executor = make_executor(max_workers=1, retries=0, resources={"h_rt": "30"})
    assert list(executor.map(nap, [6, 6, 22], timeout=150)) == [6, 6, 22]
    assert len(executor.job_ids) == 2


@pytest.mark.cluster
def test_a_memory_error_under_h_vmem_says_the_task_went_over_its_memory(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(max_workers=1, retries=2, resources={"h_vmem": "400M"})
    error = executor.submit(bytearray, 600 * 2**20).exception(timeout=60)
    assert isinstance(error, MemoryError), error
    assert getattr(error, "__notes__", [])[-1] == (
        "sheepdog: the call went over its task's memory limit: an allocation failed under the task's "
        "address-space limit of 400 MiB (ulimit -v); raise h_vmem in resources="
    )
    assert len(executor.job_ids) == 1


LEAKED: list[bytes] = []


def leak(megabytes: int) -> int:
    """Keep ``megabytes`` more in the worker after each call (a cache that grows, a leak)."""
    import time

    LEAKED.append(b"x" * (megabytes * 2**20))
    time.sleep(2)  # Slurm samples the memory every 5 s here
    return len(LEAKED)


@pytest.mark.cluster
def test_a_worker_whose_memory_grows_retires_before_its_task_goes_over_mem(
    cluster: Cluster, make_any_executor: Callable[..., ClusterExecutor]
) -> None:
    if cluster.scheduler != "slurm":
        pytest.skip("Grid Engine's h_vmem fails the allocation (MemoryError) rather than kill")
    # each call keeps 60 MB more: one worker would go over mem=300M at its fifth call and be killed
    executor = make_any_executor(max_workers=1, retries=0, mem="300M")
    kept = list(executor.map(leak, [60] * 8, timeout=240))
    assert len(executor.job_ids) >= 2 and max(kept) <= 4 and kept[0] == 1, kept


def hold_in_two_processes(megabytes: int) -> None:
    """Two processes of ``megabytes`` each: each under h_vmem, together over it (Grid Engine's
    execd then kills the task: qacct failed 37)."""
    import subprocess
    import sys
    import time

    code = f"import time; b = bytearray({megabytes} * 2**20); time.sleep(120)"
    children = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    time.sleep(120)
    for child in children:
        child.kill()


@pytest.mark.cluster
def test_grid_engine_killing_a_task_over_h_vmem_reads_as_a_memory_kill(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(max_workers=1, retries=1, resources={"h_vmem": "400M"})
    error = executor.submit(hold_in_two_processes, 250).exception(timeout=120)
    assert isinstance(error, WorkerLost), error
    headline = str(error).splitlines()[0]
    assert "was lost: Grid Engine killed its task over its memory (h_vmem=400M: maxvmem " in headline
    assert headline.endswith("; qacct failed 37); raise h_vmem in resources="), headline
    assert len(executor.job_ids) == 1  # not run again: it would be killed again
