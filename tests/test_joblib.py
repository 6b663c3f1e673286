"""joblib's "gridengine" backend: registration, n_jobs and batching here; calls on the real cell."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import joblib
import pytest
from joblib import Parallel, delayed, parallel_config
from support import our_jobs, ssh, wait_until

from sheepdog_executor import ConnectionFailed, RemoteTraceback
from sheepdog_executor.integrations import joblib_backend
from sheepdog_executor.integrations.joblib_backend import (
    GridEngineBackend,
    ReusableExecutors,
    shutdown_reusable_executors,
)

FAST = {"poll_interval": 0.5}


class Rejected(ValueError):
    """An exception of the test's own, to come back from the nodes as itself."""


def where(x: int) -> tuple[int, str, int, int]:
    """x squared, and the Grid Engine job, array task and process that computed it."""
    return (
        x * x,
        os.environ.get("SHEEPDOG_JOB_ID", ""),
        int(os.environ.get("SHEEPDOG_TASK_ID", "0")),
        os.getpid(),
    )


def span(seconds: float) -> tuple[str, int, float, float]:
    """Sleep; say in which task, from when to when."""
    start = time.time()
    time.sleep(seconds)
    return (
        os.environ.get("SHEEPDOG_JOB_ID", ""),
        int(os.environ.get("SHEEPDOG_TASK_ID", "0")),
        start,
        time.time(),
    )


def reject_thirteen(x: int) -> int:
    if x == 13:
        raise Rejected("unlucky", x)
    return x


def fail_soon_or_nap(x: int) -> int:
    """Call 0 fails after a second (naming its job); the others would run for four minutes."""
    if x == 0:
        time.sleep(1)
        raise Rejected("first", os.environ.get("SHEEPDOG_JOB_ID", ""))
    time.sleep(240)
    return x


def environment(*names: str) -> tuple[str, ...]:
    return tuple(os.environ.get(name, "") for name in names)


def numbers(n: int) -> Iterator[int]:
    yield from range(n)


@pytest.fixture(autouse=True)
def no_executor_kept_after_the_test() -> Iterator[None]:
    """Executors kept warm for the next Parallel call must not carry over to another test."""
    yield
    shutdown_reusable_executors()


def jobs_named(name: str) -> dict[str, str]:
    """job id -> state of every job called ``name`` that qstat knows: queued, running, or finished
    lately (``qstat -s z``, state "z")."""
    out = ssh("qstat -xml && echo '<!-- finished -->' && qstat -s z -xml").stdout
    found: dict[str, str] = {}
    for document in out.split("<!-- finished -->"):
        for entry in ET.fromstring(document.strip()).iter("job_list"):
            if entry.findtext("JB_name") == name:
                found.setdefault(entry.findtext("JB_job_number") or "", entry.findtext("state") or "")
    return found


def live(jobs: dict[str, str]) -> set[str]:
    return {job for job, state in jobs.items() if state != "z"}


@pytest.fixture
def new_threads() -> Callable[[], list[str]]:
    """Names of our threads started since the test began and still alive (other tests' excluded)."""
    before = set(threading.enumerate())
    return lambda: [
        t.name for t in threading.enumerate() if t not in before and t.name.startswith("sheepdog")
    ]


def peak_concurrency(spans: list[tuple[str, int, float, float]]) -> int:
    events = sorted([(start, 1) for _, _, start, _ in spans] + [(end, -1) for _, _, _, end in spans])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


# -- without the cell -----------------------------------------------------------------------------
def test_importing_the_package_registers_without_importing_joblib() -> None:
    script = textwrap.dedent(
        """
        import sys
        import sheepdog_executor.integrations
        assert "joblib" not in sys.modules
        import joblib
        from joblib.parallel import BACKENDS
        assert "gridengine" in BACKENDS
        assert "sheepdog_executor.integrations.joblib_backend" not in sys.modules
        assert joblib.parallel.__loader__.__class__.__name__ == "SourceFileLoader"
        with joblib.parallel_config(backend="gridengine", host="nowhere", max_workers=5) as config:
            print(type(config["backend"]).__name__, config["backend"].effective_n_jobs(-1))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["GridEngineBackend", "5"]


def test_importing_the_package_after_joblib_registers_and_installs_no_import_hook() -> None:
    script = textwrap.dedent(
        """
        import sys
        import sheepdog_executor
        assert "sheepdog_executor.integrations" not in sys.modules
        assert not [f for f in sys.meta_path if type(f).__module__.startswith("sheepdog_executor")]
        import joblib
        import sheepdog_executor.executor
        assert "gridengine" not in joblib.parallel.BACKENDS  # registered only when joblib came first
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    after = "import joblib, sheepdog_executor; print('slurm' in joblib.parallel.BACKENDS)"
    done = subprocess.run([sys.executable, "-c", after], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True"], done.stderr


def test_n_jobs_maps_to_max_workers() -> None:
    assert GridEngineBackend(max_workers=8).effective_n_jobs(-1) == 8
    assert GridEngineBackend(max_workers=8).effective_n_jobs(-3) == 6
    assert GridEngineBackend(max_workers=8).effective_n_jobs(None) == 8
    assert GridEngineBackend(max_workers=2).effective_n_jobs(-5) == 1
    assert GridEngineBackend(max_workers=8).effective_n_jobs(20) == 20
    assert GridEngineBackend().effective_n_jobs(-1) == joblib_backend.DEFAULT_MAX_WORKERS
    with pytest.raises(ValueError, match="n_jobs == 0"):
        GridEngineBackend().effective_n_jobs(0)


def test_n_jobs_1_runs_in_this_process_without_a_cluster(new_threads: Callable[[], list[str]]) -> None:
    # joblib's rule for every backend; the host does not exist, so an executor would fail
    with parallel_config(backend="gridengine", host="no-such-host.invalid"):
        assert Parallel(n_jobs=1)(delayed(os.getpid)() for _ in range(3)) == [os.getpid()] * 3
    assert new_threads() == []


def test_an_unreachable_host_fails_the_call_and_leaves_nothing(new_threads: Callable[[], list[str]]) -> None:
    with parallel_config(backend="gridengine", host="no-such-host.invalid"):
        with pytest.raises(ConnectionFailed, match="no-such-host.invalid"):
            Parallel(n_jobs=2)(delayed(abs)(x) for x in range(3))
    assert new_threads() == []


def test_cold_start_batches_do_not_hold_back_auto_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(joblib_backend, "time", SimpleNamespace(time=lambda: clock[0]))
    backend = GridEngineBackend()
    backend.parallel = SimpleNamespace(verbose=0)
    # sixteen batches of one, dispatched at once, all back after a 3 s cold start
    for _ in range(16):
        backend.batch_completed(1, 3.0)
    clock[0] += 0.5
    backend.batch_completed(1, 0.005)  # dispatched once workers ran
    assert backend.compute_batch_size() == 2
    # joblib's own estimate would still be dominated by the cold start
    plain = joblib.parallel.AutoBatchingMixin()
    plain.parallel = backend.parallel
    for duration in [3.0] * 16 + [0.005]:
        plain.batch_completed(1, duration)
    assert plain.compute_batch_size() == 1


class FakeExecutor:
    """What ReusableExecutors uses of an executor: status(), shutdown(), abort()."""

    def __init__(self, broken: str | None = None) -> None:
        self.broken = broken
        self.shut_down = threading.Event()
        self.stopped = False

    def status(self) -> dict[str, Any]:
        return {"broken": self.broken, "workers": []}

    def shutdown(self, wait: bool = True) -> None:
        self.shut_down.set()

    def abort(self) -> None:
        self.stopped = True


def test_a_kept_executor_is_taken_once_and_only_for_its_options() -> None:
    kept = ReusableExecutors()
    first, second = FakeExecutor(), FakeExecutor()
    kept.keep("a", first, 60)  # type: ignore[arg-type]
    assert kept.take("b") is None
    kept.keep("a", second, 60)  # type: ignore[arg-type]
    assert second.shut_down.is_set()  # one idle executor per set of options at most
    assert kept.take("a") is first
    assert kept.take("a") is None
    assert not first.shut_down.is_set()


def test_a_kept_executor_is_shut_down_after_its_idle_time(new_threads: Callable[[], list[str]]) -> None:
    kept = ReusableExecutors()
    executor = FakeExecutor()
    kept.keep("a", executor, 0.2)  # type: ignore[arg-type]
    assert executor.shut_down.wait(10)
    assert kept.take("a") is None
    wait_until(lambda: new_threads() == [], 10, "the idle timer's thread to end")


def test_a_broken_kept_executor_is_stopped_not_reused() -> None:
    kept = ReusableExecutors()
    executor = FakeExecutor(broken="the scheduler is gone")
    kept.keep("a", executor, 60)  # type: ignore[arg-type]
    assert kept.take("a") is None
    assert executor.stopped


def test_shutting_down_the_kept_executors(new_threads: Callable[[], list[str]]) -> None:
    kept = ReusableExecutors()
    executors = [FakeExecutor(), FakeExecutor()]
    kept.keep("a", executors[0], 60)  # type: ignore[arg-type]
    kept.keep("b", executors[1], 60)  # type: ignore[arg-type]
    kept.shut_down()
    assert all(e.shut_down.is_set() for e in executors)
    assert kept.take("a") is None
    wait_until(lambda: new_threads() == [], 10, "the idle timers' threads to end")


def test_equal_options_give_equal_keys() -> None:
    key = joblib_backend._options_key
    options = {"host": "fear", "setup": ["module load x"], "resources": {"h_vmem": "1G"}, "max_workers": 4}
    same = {"max_workers": 4, "resources": {"h_vmem": "1G"}, "setup": ("module load x",), "host": "fear"}
    assert key(options) == key(same)
    assert key(options) != key({**options, "max_workers": 5})
    assert key(options) != key({**options, "resources": {"h_vmem": "2G"}})


# -- on the cell ----------------------------------------------------------------------------------
@pytest.mark.cluster
def test_generator_input_runs_on_the_cell_and_leaves_no_jobs(
    cell: str, new_threads: Callable[[], list[str]]
) -> None:
    with parallel_config(backend="gridengine", host=cell, max_workers=4, reuse=False, **FAST):
        results = Parallel()(delayed(where)(x) for x in numbers(500))
    assert [r[0] for r in results] == [x * x for x in range(500)]
    jobs = {r[1] for r in results}
    assert jobs and all(job.isdigit() for job in jobs)  # ran in Grid Engine tasks
    assert os.getpid() not in {r[3] for r in results}
    assert max(r[2] for r in results) <= 4
    # without reuse the executor was shut down at the end of the call: no job, no thread left
    assert not our_jobs(jobs)
    assert new_threads() == []


@pytest.mark.cluster
def test_return_as_generator(cell: str) -> None:
    with parallel_config(backend="gridengine", host=cell, n_jobs=3, **FAST):
        ordered = Parallel(return_as="generator")(delayed(where)(x) for x in range(60))
        assert not isinstance(ordered, list)
        first = next(ordered)
        assert first[0] == 0 and first[1].isdigit()
        results = [first, *ordered]
        unordered = list(Parallel(return_as="generator_unordered")(delayed(where)(x) for x in range(60)))
    assert [r[0] for r in results] == [x * x for x in range(60)]
    assert sorted(r[0] for r in unordered) == [x * x for x in range(60)]
    shutdown_reusable_executors()
    assert not our_jobs({r[1] for r in results + unordered})


@pytest.mark.cluster
def test_abandoned_generator_stops_the_jobs(cell: str, new_threads: Callable[[], list[str]]) -> None:
    with parallel_config(backend="gridengine", host=cell, n_jobs=2, **FAST):
        results = Parallel(return_as="generator")(delayed(span)(0 if i < 2 else 120) for i in range(8))
        job, _, _, _ = next(results)
        started = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # joblib warns that tasks were cancelled: they were
            results.close()
    assert time.monotonic() - started < 60
    assert not our_jobs({job})
    assert new_threads() == []


@pytest.mark.cluster
def test_exceptions_come_back_as_their_own_type(cell: str, new_threads: Callable[[], list[str]]) -> None:
    with parallel_config(backend="gridengine", host=cell, max_workers=4, **FAST):
        with pytest.raises(Rejected) as info:
            Parallel()(delayed(reject_thirteen)(x) for x in range(40))
        with pytest.raises(ZeroDivisionError):
            Parallel(n_jobs=2)([delayed(divmod)(7, 2), delayed(divmod)(1, 0)])
    assert info.value.args == ("unlucky", 13)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in reject_thirteen" in cause.tb and 'raise Rejected("unlucky", x)' in cause.tb
    assert new_threads() == []


@pytest.mark.cluster
def test_an_error_stops_running_calls_and_removes_the_jobs(
    cell: str, new_threads: Callable[[], list[str]]
) -> None:
    started = time.monotonic()
    with parallel_config(backend="gridengine", host=cell, **FAST):
        with pytest.raises(Rejected) as info:
            Parallel(n_jobs=4)(delayed(fail_soon_or_nap)(x) for x in range(8))
    assert time.monotonic() - started < 120  # not after the other calls' four minutes
    reason, job = info.value.args
    assert reason == "first" and job.isdigit()
    assert not our_jobs({job})
    assert new_threads() == []


@pytest.mark.cluster
def test_n_jobs_is_the_number_of_workers(cell: str) -> None:
    with parallel_config(backend="gridengine", host=cell, max_workers=8, **FAST):
        spans = Parallel(n_jobs=3)(delayed(span)(0.3) for _ in range(12))
    assert len(spans) == 12
    assert peak_concurrency(spans) <= 3
    assert max(task for _, task, _, _ in spans) <= 3
    shutdown_reusable_executors()
    assert not our_jobs({job for job, _, _, _ in spans})


@pytest.mark.cluster
def test_options_reach_the_executor(cell: str) -> None:
    name = f"jl-{uuid.uuid4().hex[:8]}"
    setup = ["export SHEEPDOG_JOBLIB_PROBE=through-parallel-config"]
    with parallel_config(backend="gridengine", host=cell, job_name=name, setup=setup, **FAST):
        seen = Parallel(n_jobs=2)(delayed(environment)("JOB_NAME", "SHEEPDOG_JOBLIB_PROBE") for _ in range(4))
    assert set(seen) == {(name, "through-parallel-config")}
    # Parallel's own extra keywords reach the executor too
    other = f"jl-{uuid.uuid4().hex[:8]}"
    seen = Parallel(n_jobs=2, backend="gridengine", host=cell, job_name=other, **FAST)(
        delayed(environment)("JOB_NAME") for _ in range(2)
    )
    assert set(seen) == {(other,)}


@pytest.mark.cluster
def test_one_executor_for_a_managed_parallel_session(cell: str, new_threads: Callable[[], list[str]]) -> None:
    with parallel_config(backend="gridengine", host=cell, **FAST):
        with Parallel(n_jobs=2) as parallel:
            first = parallel(delayed(where)(x) for x in range(6))
            second = parallel(delayed(where)(x) for x in range(6, 12))
    assert [r[0] for r in first + second] == [x * x for x in range(12)]
    jobs = {r[1] for r in first}
    assert {r[1] for r in second} <= jobs  # the first call's workers ran the second
    shutdown_reusable_executors()
    assert not our_jobs(jobs)
    assert new_threads() == []


@pytest.mark.cluster
def test_two_parallel_calls_in_a_row_use_one_job(cell: str, new_threads: Callable[[], list[str]]) -> None:
    name = f"jl-{uuid.uuid4().hex[:8]}"
    with parallel_config(backend="gridengine", host=cell, job_name=name, **FAST):
        first = Parallel(n_jobs=2)(delayed(where)(x) for x in range(6))
        second = Parallel(n_jobs=2)(delayed(where)(x) for x in range(6, 12))
    assert [r[0] for r in first + second] == [x * x for x in range(12)]
    jobs = {r[1] for r in first}
    assert len(jobs) == 1 and {r[1] for r in second} == jobs
    assert set(jobs_named(name)) == jobs  # the second call submitted no job
    # kept for idle_timeout (5 s), then shut down by itself: no job, no thread left
    wait_until(lambda: not live(jobs_named(name)) and new_threads() == [], 60, "the kept executor to go")


@pytest.mark.cluster
def test_different_options_get_a_different_executor(cell: str, new_threads: Callable[[], list[str]]) -> None:
    name = f"jl-{uuid.uuid4().hex[:8]}"
    with parallel_config(backend="gridengine", host=cell, job_name=name, idle_timeout=30, **FAST):
        two = Parallel(n_jobs=2)(delayed(where)(x) for x in range(4))
        three = Parallel(n_jobs=3)(delayed(where)(x) for x in range(4))
        two_again = Parallel(n_jobs=2)(delayed(where)(x) for x in range(4))
    assert {r[1] for r in two} != {r[1] for r in three}
    assert {r[1] for r in two_again} == {r[1] for r in two}
    assert len(jobs_named(name)) == 2
    shutdown_reusable_executors()
    assert not live(jobs_named(name))
    assert new_threads() == []


@pytest.mark.cluster
def test_an_abort_does_not_break_the_next_call(cell: str, new_threads: Callable[[], list[str]]) -> None:
    name = f"jl-{uuid.uuid4().hex[:8]}"
    with parallel_config(backend="gridengine", host=cell, job_name=name, idle_timeout=30, **FAST):
        warm = Parallel(n_jobs=2)(delayed(where)(x) for x in range(4))
        with pytest.raises(Rejected):
            Parallel(n_jobs=2)(delayed(reject_thirteen)(x) for x in range(20))
        after = Parallel(n_jobs=2)(delayed(where)(x) for x in range(4))
    aborted, fresh = {r[1] for r in warm}, {r[1] for r in after}
    assert [r[0] for r in after] == [0, 1, 4, 9]
    assert fresh != aborted  # the aborted executor was not kept
    assert not live(jobs_named(name)) - fresh  # and its job is gone
    shutdown_reusable_executors()
    assert not live(jobs_named(name))
    assert new_threads() == []


@pytest.mark.cluster
def test_a_kept_executor_is_shut_down_at_exit(cell: str) -> None:
    name = f"jl-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(
        f"""
        import os
        from joblib import Parallel, delayed, parallel_config
        import sheepdog_executor
        def job_id():
            return os.environ.get("JOB_ID")
        with parallel_config(backend="gridengine", host={cell!r}, job_name={name!r}, idle_timeout=600):
            print(*Parallel(n_jobs=2)(delayed(job_id)() for _ in range(2)))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    job = done.stdout.split()[0]
    assert job.isdigit() and set(jobs_named(name)) == {job}
    # removed at exit, not kept for its 600 s (a qdel-ed job may show for a moment)
    wait_until(lambda: not live(jobs_named(name)), 30, "the job to be removed")


# -- a Parallel inside a call ----------------------------------------------------------------------
def _sum_nested(i: int) -> int:
    """Run in a loky child of a worker: the cluster backend's name still resolves there."""
    return sum(Parallel(n_jobs=2, backend="gridengine")(delayed(abs)(-j) for j in range(i)))


def _nested_parallel(n: int) -> tuple[list[int], list[int], list[str]]:
    """A call that uses joblib's cluster backend itself, then plain loky whose children do."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = Parallel(n_jobs=2, backend="gridengine")(delayed(abs)(-j) for j in range(n))
    second = Parallel(n_jobs=2)(delayed(_sum_nested)(i) for i in range(n))
    return first, second, [str(w.message) for w in seen]


@pytest.fixture(scope="module")
def node_joblib(cell: str) -> str:
    """A set-up line giving the workers this client's joblib (pure Python), copied to the cell once."""
    source = os.path.dirname(joblib.__file__)
    archive = subprocess.run(
        [
            "tar",
            "-C",
            os.path.dirname(source),
            "--exclude=__pycache__",
            "--exclude=test",
            "-czf",
            "-",
            "joblib",
        ],
        capture_output=True,
        check=True,
    ).stdout
    target = f"$HOME/.cache/sheepdog-tests/joblib-{joblib.__version__}"
    script = (  # into a fresh directory renamed into place: concurrent runs never see half of it
        f'd="{target}"; mkdir -p "$(dirname "$d")"; if [ ! -d "$d" ]; then t=$(mktemp -d "$d.XXXXXX") '
        '&& tar -C "$t" -xzf - && { mv -T "$t" "$d" 2>/dev/null || rm -rf "$t"; }; fi; echo "$d"'
    )
    done = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", cell, script],
        input=archive,
        capture_output=True,
        timeout=60,
        check=True,
    )
    return f"export PYTHONPATH={done.stdout.decode().strip().splitlines()[-1]}"


@pytest.mark.cluster
def test_a_parallel_inside_a_call_runs_on_its_node(cell: str, node_joblib: str) -> None:
    """backend="gridengine" in a call (and in a loky child of it) means loky on the node, with a
    warning, as dask's backend name resolves inside dask's workers (before: Invalid backend)."""
    from support import NODE_PYTHON

    from sheepdog_executor import GridEngineExecutor

    with GridEngineExecutor(host=cell, max_workers=1, python=NODE_PYTHON, setup=[node_joblib], **FAST) as ex:
        first, second, warned = ex.submit(_nested_parallel, 4).result(timeout=120)
    assert (first, second) == ([0, 1, 2, 3], [0, 0, 1, 3])
    assert len(warned) == 1 and "joblib backend 'gridengine' inside a sheepdog worker (job " in warned[0]
