"""The contract every scheduler module keeps, checked against each real test cluster.

A new scheduler (one module in ``sheepdog_executor/scheduler/``) adds its cluster to ``cluster_of``
and ``CELL_FIXTURES`` in ``support.py`` and passes these tests: submit an array whose tasks see their
identity as ``SHEEPDOG_JOB_ID``/``SHEEPDOG_TASK_ID`` and write where ``WorkerLaunch.output_path`` says;
poll all tasks in one call; cancel a whole job and a single task; account for a finished task; find the
user's own jobs of a session; report a job that can never start as ``TaskState.ERROR`` with the
scheduler's reason; know the site's largest array.

Each test runs twice per scheduler: on the real cell (marked ``cluster``), and in the unit tier
against that cell's answers as recorded (``tests/recorded/SCHEDULER.json``, played back by
``recorded_shell.ReplayShell``): every built-in scheduler of the registry must have a recording.
After a change of what a scheduler runs, record again on the cells:
``SHEEPDOG_RECORD_SCHEDULERS=1 python3 -m pytest tests/test_scheduler_contract.py -m cluster``.
"""

from __future__ import annotations

import io
import os
import secrets
import shlex
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
from recorded_shell import RecordingShell, ReplayShell
from support import CELL_FIXTURES, Cluster, cluster_of, wait_until

from sheepdog_executor import registry
from sheepdog_executor.jobscript import JobOptions, WorkerLaunch
from sheepdog_executor.resources import Resources
from sheepdog_executor.scheduler import Scheduler, TaskState
from sheepdog_executor.shell import SSHShell, SSHTarget

#: Every built-in scheduler, checked against its recorded answers (no cell) and on its cell.
SCHEDULERS = [row.key for row in registry.BUILTIN]
#: Record each cell's answers for the unit tier (tests/recorded/) while the cell tests run.
RECORD = os.environ.get("SHEEPDOG_RECORD_SCHEDULERS") == "1"

#: Stands in for the worker bundle: prints the task's identity, then sleeps argv[1] seconds.
_PROBE = (
    "import os, sys, time\n"
    'print("identity", os.environ.get("SHEEPDOG_JOB_ID"), os.environ.get("SHEEPDOG_TASK_ID"), flush=True)\n'
    "time.sleep(float(sys.argv[1]))\n"
)


def _bundle() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("__main__.py", _PROBE)
    return buffer.getvalue()


@pytest.fixture(
    params=[
        *(pytest.param(("cell", key), marks=pytest.mark.cluster, id=f"{key}-cell") for key in SCHEDULERS),
        *(pytest.param(("recorded", key), id=f"{key}-recorded") for key in SCHEDULERS),
    ]
)
def cluster(request: pytest.FixtureRequest) -> Cluster:
    """The cluster of each built-in scheduler: the real one, or its recorded answers."""
    mode, key = request.param
    return cluster_of(key, request.getfixturevalue(CELL_FIXTURES[key]) if mode == "cell" else mode)


@pytest.fixture
def scheduler(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[tuple[Scheduler, str]]:
    """(the cluster's scheduler, a session directory with the probe bundle): over SSH to the
    cell (its answers recorded with ``SHEEPDOG_RECORD_SCHEDULERS=1``), or played back."""
    test = request.node.originalname
    shell: Any
    if cluster.alias == "recorded":
        shell = ReplayShell(cluster.scheduler, test)
        session = shell.session
    else:
        shell = RecordingShell(SSHShell(SSHTarget.resolve(cluster.alias)))
        session = f"{{home}}/.sheepdog-executor/contract-{secrets.token_hex(4)}"
    home = shell.run('printf %s "$HOME"').stdout
    session = session.replace("{home}", home)
    shell.put(f"{session}/bundle.zip", _bundle(), 0o600)
    made = cluster.executor.scheduler_class(
        shell, JobOptions(job_name="sd-contract"), site=cluster.executor.scheduler_class.Options()
    )
    submitted: list[str] = []
    original = made.submit

    def submit(launch: WorkerLaunch, tasks: int) -> str:
        job = original(launch, tasks)
        submitted.append(job)
        return job

    made.submit = submit  # type: ignore[method-assign]
    try:
        yield made, session
    finally:
        made.cancel(submitted)
        shell.run(f"rm -rf {shlex.quote(session)}")
        shell.close()
        if RECORD and isinstance(shell, RecordingShell):
            shell.save(cluster.scheduler, test, session)


def test_submit_poll_identity_and_output(scheduler: tuple[Scheduler, str]) -> None:
    made, session = scheduler
    launch = WorkerLaunch(session, "1")  # the probe sleeps 1 s
    job = made.submit(launch, 3)
    states = made.poll([job, "999999999"])
    assert set(states) <= {job} and set(states.get(job, {})) <= {1, 2, 3}
    wait_until(lambda: not made.poll([job]), 120, "the job to end")
    for task in (1, 2, 3):
        out = made.run(f"cat {shlex.quote(launch.output_path(job, task, 'out'))}").stdout
        assert out.split() == ["identity", job, str(task)]


def test_cancel_a_job_and_a_single_task(scheduler: tuple[Scheduler, str]) -> None:
    made, session = scheduler
    launch = WorkerLaunch(session, "300")
    job = made.submit(launch, 2)
    wait_until(lambda: set(made.poll([job]).get(job, {})) == {1, 2}, 60, "both tasks listed")
    made.cancel_task(job, 2)
    wait_until(lambda: set(made.poll([job]).get(job, {})) == {1}, 60, "task 2 removed, task 1 left")
    made.cancel([job])
    wait_until(lambda: not made.poll([job]), 60, "the job removed")


def test_accounting_of_a_finished_task(scheduler: tuple[Scheduler, str]) -> None:
    made, session = scheduler
    job = made.submit(WorkerLaunch(session, "0"), 1)
    wait_until(lambda: not made.poll([job]), 120, "the job to end")
    record: dict[str, str] = {}

    def recorded() -> bool:
        record.update(made.accounting(job, 1))
        return bool(record)

    wait_until(recorded, 60, "the accounting record")
    assert any(key in record for key in made.summary_keys)


def test_the_users_jobs_of_a_session_are_found(scheduler: tuple[Scheduler, str]) -> None:
    made, session = scheduler
    launch = WorkerLaunch(session, "300")
    job = made.submit(launch, 1)
    assert made.find_jobs(launch) == [job]
    root, name = session.rsplit("/", 1)
    assert [(j.id, j.session) for j in made.session_jobs(root) if j.session == name] == [(job, name)]
    assert made.find_jobs(WorkerLaunch(f"{root}/contract-other", "x")) == []


def test_a_job_that_can_never_start_is_an_error_with_the_reason(
    cluster: Cluster, scheduler: tuple[Scheduler, str]
) -> None:
    made, session = scheduler
    options = dict(cluster.never_starts)
    needs = Resources.parse({name: options.pop(name) for name in ("time", "mem") if name in options})
    directory = options.pop("working_directory", None)
    job_options = JobOptions(job_name="sd-contract", working_directory=directory, needs=needs)
    held = type(made)(made.shell, job_options, site=made.Options(**options))
    job = held.submit(WorkerLaunch(session, "0"), 1)
    try:
        wait_until(lambda: TaskState.ERROR in held.poll([job]).get(job, {}).values(), 60, "the error state")
        assert cluster.never_starts_reason in held.error_reason(job)
    finally:
        held.cancel([job])


def test_the_sites_largest_array_is_known(scheduler: tuple[Scheduler, str]) -> None:
    made, _ = scheduler
    limit = made.max_array_size()
    assert limit is not None and limit >= 100
