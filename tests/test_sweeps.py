"""Sweeps (``sweep=``): results kept on the cluster, served on a rerun, refused when tampered with.

The first tests need no cell (the key, the records, ``LocalExecutor``); those marked ``cluster``
run on the real cells, counting the runs of each call by the file each run leaves.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import pytest
from support import NODE_PYTHON, Cluster, read_line, spawn, ssh_to, wait_until
from test_multihost import NODES, make_multi, mssh, multi_cell, where  # noqa: F401 - fixtures

from sheepdog_executor import GridEngineExecutor, LocalExecutor
from sheepdog_executor.callkey import call_key, function_digest
from sheepdog_executor.errors import ConfigurationError, SweepKeyError, SweepStoreRefused, WorkerLost
from sheepdog_executor.remote import store
from sheepdog_executor.testing import internals

HERE = Path(__file__).parent
REPO = HERE.parent


# -- the key ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Point:
    x: int
    y: float


def _key_in_child(expression: str) -> str:
    """A program printing the key of a call of ``f`` with ``expression``'s arguments, ``f`` taken
    from the module file given as its argument."""
    return textwrap.dedent(
        f"""
        import sys, importlib.util
        sys.path.insert(0, {str(REPO)!r})
        from sheepdog_executor.callkey import call_key, function_digest
        spec = importlib.util.spec_from_file_location("user_mod", sys.argv[1])
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        args = eval({expression!r}, vars(mod))
        print(call_key(function_digest(mod.f), args, {{}}))
        """
    )


def _keys_in_processes(tmp_path: Path, source: str, expression: str, times: int = 2) -> list[str]:
    module = tmp_path / f"m{uuid.uuid4().hex}.py"
    module.write_text(textwrap.dedent(source))
    program = _key_in_child(expression)
    keys = []
    for seed in range(times):  # a different string hash seed each time
        env = dict(os.environ, PYTHONHASHSEED=str(seed + 1))
        done = subprocess.run(
            [sys.executable, "-c", program, str(module)], capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 0, done.stderr
        keys.append(done.stdout.strip())
    return keys


USER_MODULE = """
import dataclasses, numpy
SCALE = 3

@dataclasses.dataclass
class P:
    x: int
    tags: frozenset

def helper(v):
    return v * SCALE

def f(a, b=None):
    return helper(a)
"""
ARGUMENTS = (
    "(1, 2.5, 'text', (1, [2, {'k': {3, 4}}]), {'b', 'a', 'c'}, numpy.arange(6.0).reshape(2, 3), "
    "P(1, frozenset({'u', 'v'})))"
)


def test_a_key_is_the_same_in_every_process_and_changes_with_the_body_a_global_or_an_argument(
    tmp_path: Path,
) -> None:
    first, second = _keys_in_processes(tmp_path, USER_MODULE, ARGUMENTS)
    assert first == second and len(first) == 64
    [body] = _keys_in_processes(
        tmp_path, USER_MODULE.replace("return v * SCALE", "return v * SCALE + 1"), ARGUMENTS, 1
    )
    [global_] = _keys_in_processes(tmp_path, USER_MODULE.replace("SCALE = 3", "SCALE = 4"), ARGUMENTS, 1)
    [argument] = _keys_in_processes(tmp_path, USER_MODULE, ARGUMENTS.replace("2.5", "2.25"), 1)
    [array] = _keys_in_processes(tmp_path, USER_MODULE, ARGUMENTS.replace("arange(6.0)", "arange(6)"), 1)
    assert len({first, body, global_, argument, array}) == 5


def test_equal_values_give_equal_keys_and_an_argument_without_a_plain_pickle_is_named() -> None:
    def f(x: Any) -> Any:
        return x

    digest = function_digest(f)
    assert call_key(digest, ({"a": 1, "b": 2},), {}) == call_key(digest, ({"b": 2, "a": 1},), {})
    assert call_key(digest, (Point(1, 2.0),), {}) == call_key(digest, (Point(1, 2.0),), {})
    assert call_key(digest, (1,), {}) != call_key(digest, (True,), {}) != call_key(digest, (1.0,), {})
    assert call_key(digest, (numpy.zeros(3),), {}) != call_key(digest, (numpy.zeros(4),), {})
    with pytest.raises(SweepKeyError, match="type generator"):
        call_key(digest, ((i for i in range(3)),), {})


def test_a_bad_sweep_name_is_refused_naming_the_rule() -> None:
    with pytest.raises(ConfigurationError, match="letters, digits"):
        LocalExecutor(sweep="../x")


# -- the records -----------------------------------------------------------------------------------
def test_a_record_round_trips_and_a_changed_one_is_refused() -> None:
    key, call = b"k" * 64, "a" * 64
    written = store.line(key, store.RETURNED, call, "run-1", pickle.dumps([1, 2])).decode().rstrip("\n")
    assert store.parse(key, written) == store.Record("R", call, "run-1", pickle.dumps([1, 2]))
    for changed in (written.replace("run-1", "run-2"), written[:-1] + "0", "R junk"):
        with pytest.raises(store.BadRecord):
            store.parse(key, changed)
    with pytest.raises(store.BadRecord, match="MAC"):
        store.parse(b"x" * 64, written)


# -- LocalExecutor ---------------------------------------------------------------------------------
MARKS = Path(os.environ.get("TMPDIR", "/tmp")) / f"sheepdog-sweep-marks-{os.getpid()}"


def marked(x: int) -> int:
    """A call whose every run leaves a file in MARKS."""
    (MARKS / f"{x}.{os.getpid()}.{time.time_ns()}").touch()
    if x == -99:
        os._exit(3)  # the worker dies
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def _runs() -> dict[int, int]:
    counts: dict[int, int] = {}
    for name in os.listdir(MARKS):
        x = int(name.split(".")[0])
        counts[x] = counts.get(x, 0) + 1
    return counts


@pytest.fixture
def local_sweep(tmp_path: Path) -> Iterator[dict[str, Any]]:
    MARKS.mkdir(exist_ok=True)
    for name in os.listdir(MARKS):
        os.unlink(MARKS / name)
    yield {"session_root": str(tmp_path / "root"), "sweep": "s1", "max_workers": 2, "progress": False}


def test_a_rerun_serves_every_kept_result_and_submits_no_job(local_sweep: dict[str, Any]) -> None:
    with LocalExecutor(**local_sweep) as executor:
        assert list(executor.map(marked, range(20))) == [x * x for x in range(20)]
    with LocalExecutor(**local_sweep) as executor:
        assert list(executor.map(marked, range(20))) == [x * x for x in range(20)]
        assert executor.submit(marked, 3).result(timeout=30) == 9
        assert executor.job_ids == []
        assert executor.sweep is not None and executor.sweep.served == 21
    assert _runs() == {x: 1 for x in range(20)}


def test_a_rerun_runs_only_the_new_calls_and_those_that_raised(local_sweep: dict[str, Any]) -> None:
    with LocalExecutor(**local_sweep) as executor:
        futures = [executor.submit(marked, x) for x in (-1, 1, 2)]
        assert isinstance(futures[0].exception(timeout=60), ValueError)
    with LocalExecutor(**local_sweep) as executor:
        futures = [executor.submit(marked, x) for x in (-1, 1, 2, 3)]
        assert isinstance(futures[0].exception(timeout=60), ValueError)
        assert [f.result(timeout=60) for f in futures[1:]] == [1, 4, 9]
        assert executor.sweep is not None and (executor.sweep.served, executor.sweep.sent) == (2, 2)
    assert _runs() == {-1: 2, 1: 1, 2: 1, 3: 1}


def test_a_kept_result_costs_on_disk_what_the_readme_says(local_sweep: dict[str, Any]) -> None:
    """README: "about 350 bytes plus 4/3 of its pickled size (2,000 small results: 0.7 MB)"."""
    readme = " ".join((REPO / "README.rst").read_text().split())
    cost = r"about (\d+) bytes plus 4/3 of its pickled size.*?\(2,000 small results: ([\d.]+) MB\)"
    said = re.search(cost, readme)
    assert said, "the README's disk cost per kept result moved: update this test"
    per_record, small_total = int(said.group(1)), float(said.group(2))
    records = Path(local_sweep["session_root"]) / "sweeps" / local_sweep["sweep"] / store.RECORDS

    def size() -> int:
        return sum(path.stat().st_size for path in records.iterdir())

    with LocalExecutor(**local_sweep) as executor:
        assert list(executor.map(abs, range(2000))) == list(range(2000))
    small = size()
    assert small == pytest.approx(small_total * 1e6, rel=0.1)
    assert small / 2000 == pytest.approx(per_record + 4 / 3 * len(pickle.dumps(1999, protocol=5)), rel=0.1)
    sizes = range(30_000, 30_020)
    with LocalExecutor(**local_sweep) as executor:
        assert [len(b) for b in executor.map(bytes, sizes)] == list(sizes)
    large = size() - small
    expected = sum(per_record + 4 / 3 * len(pickle.dumps(bytes(n), protocol=5)) for n in sizes)
    assert large == pytest.approx(expected, rel=0.02)


def test_a_lost_worker_s_kept_results_are_served_not_run_again(local_sweep: dict[str, Any]) -> None:
    """A worker dies in the second call of a reply: the first, kept before, is served from its file;
    only the call it died in is lost."""
    with LocalExecutor(**{**local_sweep, "max_workers": 1}) as executor:
        assert executor.submit(marked, 0).result(timeout=60) == 0  # the calls' duration is known
        results = executor.map(marked, [1, -99, 2, 3], timeout=60)  # a first reply of [1, -99]
        assert next(results) == 1
        with pytest.raises(WorkerLost):
            next(results)
    assert _runs() == {0: 1, 1: 1, -99: 1}


def slowly(x: int) -> int:
    time.sleep(0.3)
    return marked(x)


def test_detach_hands_the_calls_over_and_a_new_executor_attaches_to_their_results(
    local_sweep: dict[str, Any],
) -> None:
    with LocalExecutor(**local_sweep) as executor:
        results = executor.map(slowly, range(20))
        assert next(results) == 0
        handed = executor.detach()
    assert 0 < handed < 20
    wait_until(lambda: len(_runs()) == 20, 60, "every call run by the detached workers")
    with LocalExecutor(**local_sweep) as executor:
        futures = executor.attach()
        assert [f.result(timeout=60) for f in futures] == [x * x for x in range(20 - handed, 20)]
        assert executor.job_ids == []
    assert _runs() == dict.fromkeys(range(20), 1)


def test_a_planted_or_corrupted_record_is_refused_and_nothing_is_unpickled(
    local_sweep: dict[str, Any], tmp_path: Path
) -> None:
    with LocalExecutor(**local_sweep) as executor:
        assert executor.submit(marked, 5).result(timeout=60) == 25
        assert executor.sweep is not None
        directory = Path(executor.sweep.directory)
    [records] = list((directory / store.RECORDS).iterdir())
    planted = tmp_path / "planted"

    class Plant:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(planted),))

    good = records.read_text().splitlines()
    kind, call, run, _, _ = good[-1].split(" ")
    evil = store.line(b"not the sweep's key", kind, call, run, pickle.dumps(Plant())).decode()
    records.write_text("\n".join(good[:-1]) + "\n" + evil)
    with pytest.raises(SweepStoreRefused, match=f"record {len(good)} of .*{records.name}.* refused"):
        LocalExecutor(**local_sweep)
    flipped = good[-1][:-3] + ("0" if good[-1][-3] != "0" else "1") + good[-1][-2:]
    records.write_text("\n".join([*good[:-1], flipped]) + "\n")
    with pytest.raises(SweepStoreRefused, match="MAC"):
        LocalExecutor(**local_sweep)
    assert not planted.exists()


# -- the real cells --------------------------------------------------------------------------------
CHILD = HERE / "child_sweep.py"


@dataclasses.dataclass
class CellSweep:
    """A sweep name and a directory for the marks of its calls' runs, on one cluster."""

    cluster: Cluster
    name: str
    marks: str
    jobs: set[str] = dataclasses.field(default_factory=set)
    #: The session directories of the clients (a killed one's is left behind).
    sessions: set[str] = dataclasses.field(default_factory=set)

    def client(self, count: int, seconds: float, when: str) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO), NODE_PYTHON=NODE_PYTHON)
        args = [sys.executable, str(CHILD), self.cluster.scheduler, self.cluster.alias, self.name]
        return spawn(
            [*args, str(count), self.marks, str(seconds), when],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def line(self, child: subprocess.Popen[str], within: float, what: str) -> dict[str, Any]:
        said = json.loads(read_line(child, within, what))
        self.jobs.update(said["jobs"])
        self.sessions.update([said["session"]] if "session" in said else [])
        return said

    def runs(self) -> dict[int, int]:
        """How many times each call ran, by the files its runs left."""
        done = self.cluster.ssh(f"ls {self.marks}")
        assert done.returncode == 0, done.stderr
        counts: dict[int, int] = {}
        for name in done.stdout.split():
            x = int(name.split(".")[0])
            counts[x] = counts.get(x, 0) + 1
        return counts

    def tasks_left(self, jobs: set[str]) -> dict[str, list[str]]:
        return self.cluster.jobs(jobs)


@pytest.fixture
def cell_sweep(cluster: Cluster) -> Iterator[CellSweep]:
    tag = uuid.uuid4().hex[:8]
    sweep = CellSweep(cluster, f"test-{tag}", f".cache/sheepdog-tests/sweep-marks-{tag}")
    assert cluster.ssh(f"mkdir -p {sweep.marks}").returncode == 0
    yield sweep
    remove = "qdel" if cluster.scheduler == "gridengine" else "scancel"
    left = cluster.jobs(sweep.jobs)
    if left:
        cluster.ssh(f"{remove} {' '.join(sorted(left))}")
    left_behind = " ".join(shlex.quote(path) for path in sorted(sweep.sessions))
    cluster.ssh(f"rm -rf {sweep.marks} .sheepdog-executor/sweeps/{sweep.name} {left_behind}")


@pytest.mark.cluster
def test_a_client_killed_mid_map_is_resumed_by_a_rerun_and_no_finished_call_runs_twice(
    cell_sweep: CellSweep,
) -> None:
    """2,000 small calls, the client SIGKILLed with a quarter of them back and others running; the
    rerun gets every result right, and each call ran once: those that finished before the kill,
    and those its workers finished after it, are served from the store."""
    first = cell_sweep.client(2000, 0.02, "quarter")
    cell_sweep.line(first, 180, "the first client's jobs")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    ran_before = len(cell_sweep.runs())
    second = cell_sweep.client(2000, 0.02, "quarter")
    cell_sweep.line(second, 180, "the rerun's first quarter")
    summary = cell_sweep.line(second, 300, "the rerun's results")
    assert second.wait(60) == 0
    runs = cell_sweep.runs()
    assert summary["right"] == 2000
    assert summary["served"] >= ran_before > 0
    assert runs == dict.fromkeys(range(2000), 1), {x: n for x, n in runs.items() if n != 1}


@pytest.mark.cluster
def test_a_killed_clients_workers_keep_their_results_and_free_their_slots(cell_sweep: CellSweep) -> None:
    """Four calls of 8 s running when the client gets SIGKILL: each worker keeps its result and
    leaves (without a sweep they hold their slots for disconnect_tolerance, 600 s); a rerun then
    serves all four and submits no job."""
    first = cell_sweep.client(4, 8, "running")
    jobs = set(cell_sweep.line(first, 180, "the first client's workers running")["jobs"])
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    killed = time.monotonic()
    wait_until(lambda: not cell_sweep.tasks_left(jobs), 90, "the killed client's tasks gone")
    print(f"the tasks left {time.monotonic() - killed:.0f} s after the client's SIGKILL")
    second = cell_sweep.client(4, 8, "quarter")
    cell_sweep.line(second, 60, "the rerun's first quarter")
    summary = cell_sweep.line(second, 60, "the rerun's results")
    assert (summary["right"], summary["served"], summary["jobs"]) == (4, 4, [])
    assert cell_sweep.runs() == dict.fromkeys(range(4), 1)


@pytest.mark.cluster
def test_a_detached_sweep_finishes_with_no_client_and_a_new_process_attaches_to_its_results(
    cell_sweep: CellSweep,
) -> None:
    """A map of 60 calls of 1 s detached after its first result: the client exits, the calls it
    handed over all run with no client alive; a new process attaches and gets each result, in
    order, from the store, submitting no job; every call ran once."""
    first = cell_sweep.client(60, 1, "detach")
    handed = cell_sweep.line(first, 180, "the detaching client's report")["handed"]
    assert first.wait(60) == 0 and 0 < handed < 60
    wait_until(lambda: len(cell_sweep.runs()) == 60, 120, "every call run with no client")
    second = cell_sweep.client(60, 1, "attach")
    summary = cell_sweep.line(second, 120, "the attached results")
    assert second.wait(60) == 0
    assert (summary["right"], summary["served"], summary["jobs"]) == (handed, handed, [])
    assert cell_sweep.runs() == dict.fromkeys(range(60), 1)


def _flip(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


@pytest.mark.cluster
def test_a_corrupted_or_replaced_store_file_on_the_cell_is_refused_and_nothing_unpickled(
    make_executor: Callable[..., GridEngineExecutor], cell: str
) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    planted = f".cache/sheepdog-tests/planted-{name}"
    try:
        executor = make_executor(sweep=name)
        assert list(executor.map(abs, range(-4, 0))) == [4, 3, 2, 1]
        executor.shutdown()
        modes = ssh_to(cell, f"cd .sheepdog-executor/sweeps && stat -c %a {name} {name}/key {name}/records")
        assert modes.stdout.split() == ["700", "600", "700"]  # no other user can plant or read a file
        records = f".sheepdog-executor/sweeps/{name}/records"
        listing = shlex.split(ssh_to(cell, f"ls {records}").stdout)
        target = f"{records}/{listing[0]}"
        good = ssh_to(cell, f"cat {target}").stdout.splitlines()

        class Plant:
            def __reduce__(self) -> tuple[Any, ...]:
                return (os.mkdir, (os.path.expanduser(f"~/{planted}"),))

        kind, call, run, _, _ = good[-1].split(" ")
        evil = store.line(b"another key", kind, call, run, pickle.dumps(Plant())).decode()
        for replaced in ([*good[:-1], evil.rstrip()], [*good[:-1], _flip(good[-1])]):
            body = shlex.quote("\n".join(replaced) + "\n")
            assert ssh_to(cell, f"printf %s {body} > {target}").returncode == 0
            with pytest.raises(SweepStoreRefused, match=f"record {len(good)} of .*{listing[0]} .*refused"):
                make_executor(sweep=name)
        assert ssh_to(cell, f"test -e {planted} || echo absent").stdout.strip() == "absent"
    finally:
        ssh_to(cell, f"rm -rf .sheepdog-executor/sweeps/{name} {planted}")


@pytest.mark.multihost
def test_on_several_hosts_the_nodes_keep_results_and_the_head_node_serves_them(
    make_multi: Callable[..., GridEngineExecutor],  # noqa: F811 - the fixture imported above
) -> None:
    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        first = make_multi(max_workers=12, sweep=name)  # more than one host's 8 slots
        results = list(first.map(where, range(48), [0.5] * 48, timeout=180))
        assert {host for _, host in results} == set(NODES)
        first.shutdown()
        second = make_multi(max_workers=12, sweep=name)
        assert list(second.map(where, range(48), [0.5] * 48, timeout=60)) == results
        assert second.job_ids == [] and second.sweep is not None and second.sweep.served == 48
    finally:
        mssh(f"rm -rf .sheepdog-executor/sweeps/{name}")


@pytest.mark.cluster
def test_sweeps_lists_counts_and_size_and_cleanup_removes_a_sweep_only_once_its_client_is_gone(
    make_executor: Callable[..., GridEngineExecutor], cell: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sheepdog_executor.cli.main import main

    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        executor = make_executor(sweep=name)
        futures = [executor.submit(divmod, 7, d) for d in (1, 2, 3, 0)]
        assert isinstance(futures[-1].exception(timeout=120), ZeroDivisionError)
        assert [f.result() for f in futures[:3]] == [(7, 0), (3, 1), (2, 1)]
        assert main(["sweeps", cell]) == 0
        [row] = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(name)]
        assert row[1:5] == ["3", "0", "0", "1"] and row[6] == "MB", row  # done running queued failed
        assert main(["cleanup", cell, "--sweep", name]) == 1
        assert f"kept sweep {name}: session" in capsys.readouterr().out
        executor.shutdown()
        assert main(["cleanup", cell, "--sweep", name]) == 0
        assert f"removed sweep {name}: 3 kept result(s)" in capsys.readouterr().out
        assert main(["sweeps", cell]) == 0
        assert name not in capsys.readouterr().out
    finally:
        ssh_to(cell, f"rm -rf .sheepdog-executor/sweeps/{name}")


def slow(x: int) -> int:
    time.sleep(6)
    return x


@pytest.mark.cluster
def test_cleanup_keeps_a_sweep_whose_detached_tasks_still_run(
    make_any_executor: Callable[..., Any], cluster: Cluster
) -> None:
    from sheepdog_executor.cli.sweeps import remove_sweep

    name = f"test-{uuid.uuid4().hex[:8]}"
    executor = make_any_executor(max_workers=1, sweep=name)
    root = os.path.dirname(executor.session_dir)
    results = executor.map(slow, range(4))
    assert next(results) == 0
    assert executor.detach() >= 2
    other = make_any_executor()
    view = internals(other)
    scheduler, shell = view.scheduler, view.shell
    detached = sorted({job.id for job in scheduler.session_jobs(f"{root}/sweeps/{name}")})
    try:
        out = io.StringIO()
        assert not remove_sweep(shell, scheduler, root, name, set(), False, out)
        assert f"kept sweep {name}: its detached calls still run (job {detached[0]})" in out.getvalue()
    finally:
        scheduler.cancel(detached)
        cluster.ssh(f"rm -rf .sheepdog-executor/sweeps/{name}")
