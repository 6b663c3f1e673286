"""Fast unit tests of single modules: protocol, job script, scheduler output parsing, dispatcher."""

from __future__ import annotations

import hashlib
import pickle
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import cloudpickle
import pytest
from support import wait_until

from sheepdog_executor import ConfigurationError, GridEngineExecutor, LocalExecutor, pickling
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.errors import PicklingFailed, SchedulerError, WorkerLost
from sheepdog_executor.jobscript import (
    SETUP_FAILED_EXIT,
    JobOptions,
    SetupFailure,
    WorkerLaunch,
    setup_failure,
    with_setup,
)
from sheepdog_executor.remote import protocol
from sheepdog_executor.remote.protocol import Error, Result
from sheepdog_executor.scheduler.base import Scheduler, TaskState, session_of
from sheepdog_executor.scheduler.gridengine import (
    GridEngineOptions,
    GridEngineScheduler,
    parse_max_aj_tasks,
    parse_qacct,
    parse_qstat_j,
    parse_qstat_xml,
)
from sheepdog_executor.scheduler.slurm import SlurmScheduler
from sheepdog_executor.server import ResultParts
from sheepdog_executor.sessiondir import owner_and_mode, unsafe_part
from sheepdog_executor.shell import Completed, LocalShell, Shell

#: also run with Python 3.10 and 3.13 (scripts/run-tests.sh)
pytestmark = pytest.mark.pythons

SECRET = b"s" * 64


def test_signed_request_checks_out_and_tampering_does_not() -> None:
    header, nonce = protocol.sign_request(SECRET, "POST", "/work", b"body")
    assert protocol.check_request(SECRET, header, "POST", "/work", b"body") == nonce
    assert protocol.check_request(SECRET, header, "POST", "/work", b"bodY") is None
    assert protocol.check_request(SECRET, header, "POST", "/hello", b"body") is None
    assert protocol.check_request(b"x" * 64, header, "POST", "/work", b"body") is None
    assert protocol.check_request(SECRET, header, "POST", "/work", b"body", now=time.time() + 3600) is None
    assert protocol.check_request(SECRET, None, "POST", "/work", b"body") is None
    mac = protocol.sign_response(SECRET, nonce, b"reply")
    assert protocol.check_response(SECRET, nonce, b"reply", mac)
    assert not protocol.check_response(SECRET, "other", b"reply", mac)


def test_request_headers_are_checked_without_the_body_and_junk_is_refused_quietly() -> None:
    body = b"x" * 1000
    header, nonce = protocol.sign_request(SECRET, "POST", "/work", body)
    auth = protocol.check_request_headers(SECRET, header, "POST", "/work", len(body))
    assert auth is not None and auth.nonce == nonce and auth.digest == hashlib.sha256(body).hexdigest()
    assert protocol.check_request_headers(SECRET, header, "POST", "/work", 10**9) is None  # length is signed
    ts, nonce_part, digest, mac = header.split(":")
    for junk in (f"²:{nonce_part}:{digest}:{mac}", f"{ts}:{nonce_part}:{digest}:{'é' * 64}", header.upper()):
        assert protocol.check_request_headers(SECRET, junk, "POST", "/work", len(body)) is None
    lengths = ("12", "²", "1²", "٣", "-1", " 1", "1, 1", None)
    assert [protocol.parse_length(v) for v in lengths] == [12] + [None] * 7
    assert not protocol.check_response(SECRET, nonce, b"reply", "é" * 64)


def test_job_script_has_options_and_no_secret() -> None:
    options = JobOptions(job_name="sweep", setup=("module load python/3.11",), python="/opt/py/bin/python3")
    site = GridEngineOptions(
        queue="long.q",
        resources={"h_vmem": "2G", "h_rt": "1:00:00"},
        parallel_environment="smp",
        slots=4,
        qsub_args=("-P", "proj x"),
    )
    launch = WorkerLaunch("/home/u/.sheepdog-executor/s1", "http://10.0.0.5:4242")
    script = GridEngineScheduler(LocalShell(), options, site=site).render(launch, 8)
    for line in (
        "#$ -N sweep",
        "#$ -t 1-8",
        "#$ -q long.q",
        "#$ -l h_vmem=2G",
        "#$ -l h_rt=1:00:00",
        "#$ -pe smp 4",
        "#$ -P 'proj x'",
        "module load python/3.11",
        'SHEEPDOG_JOB_ID="$JOB_ID"; SHEEPDOG_TASK_ID="$SGE_TASK_ID"',
    ):
        assert line in script
    # the set-up lines and the worker run in a login bash, whatever shell Grid Engine starts
    assert "\nexec /bin/bash -l -c '" in script
    assert (
        "\n    /opt/py/bin/python3 /home/u/.sheepdog-executor/s1/bundle.zip http://10.0.0.5:4242 "
        "/home/u/.sheepdog-executor/s1/secret\n"
    ) in script


QSTAT = """<?xml version='1.0'?>
<job_info><queue_info>
 <job_list state="running"><JB_job_number>7</JB_job_number><state>r</state><tasks>1</tasks></job_list>
 <job_list state="running"><JB_job_number>7</JB_job_number><state>t</state><tasks>2</tasks></job_list>
 <job_list state="running"><JB_job_number>9</JB_job_number><state>r</state><tasks>1</tasks></job_list>
</queue_info><job_info>
 <job_list state="pending"><JB_job_number>7</JB_job_number><state>qw</state><tasks>3-7:2</tasks></job_list>
</job_info></job_info>"""


def test_parse_qstat_xml_expands_task_ranges_and_filters_jobs() -> None:
    states = parse_qstat_xml(QSTAT, {"7"})
    assert states == {
        "7": {
            1: TaskState.RUNNING,
            2: TaskState.RUNNING,
            3: TaskState.QUEUED,
            5: TaskState.QUEUED,
            7: TaskState.QUEUED,
        }
    }


def test_parse_qacct_and_qstat_j() -> None:
    record = parse_qacct(
        "==============\nqname all.q\nfailed       100 : assumedly after job\n"
        "exit_status  137 (Killed)\nmaxvmem 1.2G\n"
    )
    assert record["failed"] == "100 : assumedly after job" and record["exit_status"] == "137 (Killed)"
    fields = parse_qstat_j(
        "==============\njob_number:                 11\nerror reason    1:          12/02/2026 10:00:00 "
        "[1000:77]: error: can't chdir to /nonexistent: No such file or directory\n"
        "scheduling info:            queue instance all.q@n1 dropped because it is full\n"
    )
    assert fields["job_number"] == ["11"]
    assert fields["error reason"][0].endswith("can't chdir to /nonexistent: No such file or directory")
    assert fields["scheduling info"] == ["queue instance all.q@n1 dropped because it is full"]
    assert parse_max_aj_tasks("max_aj_instances 2000\nmax_aj_tasks 75000\n") == 75000
    assert parse_max_aj_tasks("max_aj_tasks 0\n") is None


def test_qacct_says_when_grid_engine_killed_a_task_over_a_limit() -> None:
    site = GridEngineOptions(resources={"h_rt": "0:0:5", "h_vmem": "2G", "arch": "x86"})
    scheduler = GridEngineScheduler(LocalShell(), JobOptions(), site=site)
    over = parse_qacct("failed       37  : qmaster enforced h_rt, h_cpu, or h_vmem limit\nexit_status 137\n")
    assert scheduler.killed_for(over) == (
        "Grid Engine killed its task over a limit (h_rt=0:0:5, h_vmem=2G; qacct failed 37); "
        "raise it in resources="
    )
    assert scheduler.killed_for({"failed": "100 : assumedly after job", "exit_status": "137"}) == ""
    assert scheduler.killed_for({"failed": "0"}) == ""


def test_session_of_a_task_output_path() -> None:
    root = "/h/.sheepdog-executor"
    assert session_of(f"{root}/s1/task-$JOB_ID-$TASK_ID.out", root, "$JOB_ID", "$TASK_ID") == "s1"
    assert session_of(f"{root}/s1/task-%A-%a.out", root, "%A", "%a") == "s1"
    assert session_of(f"{root}/s1/task-%A-%a.out", root, "$JOB_ID", "$TASK_ID") is None
    assert session_of(f"{root}/a/b/task-$JOB_ID-$TASK_ID.out", root, "$JOB_ID", "$TASK_ID") is None
    assert session_of("/tmp/x.out", root, "$JOB_ID", "$TASK_ID") is None


def test_grid_engine_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="slots= needs parallel_environment="):
        GridEngineOptions(slots=4)


def _qstat_j_element(job: str, owner: str, out: str) -> str:
    return (
        f"<element><JB_job_number>{job}</JB_job_number><JB_owner>{owner}</JB_owner>"
        f"<JB_job_name>n{job}</JB_job_name><JB_stdout_path_list><path_list><PN_host>NONE</PN_host>"
        f"<PN_path>{out}</PN_path></path_list></JB_stdout_path_list></element>"
    )


def unbounded(script: str) -> str:
    """The lines of a script of ``Scheduler.run``, out of ``bounded``'s remote timeout."""
    if "command -v timeout" not in script:
        return script
    words = shlex.split(script.partition("\n")[2])
    return words[words.index("-c") + 1]


class ScriptedShell(Shell):
    """Answers commands from a script of (command start, output); records every command run."""

    def __init__(self, answers: list[tuple[str, str]]) -> None:
        self.answers = answers
        self.commands: list[str] = []

    def run(
        self, command: str, *, stdin: bytes = b"", timeout: float = 120.0, retry: bool = True
    ) -> Completed:  # noqa: E501
        command = unbounded(command)
        self.commands.append(command)
        output = next((out for start, out in self.answers if command.startswith(start)), "")
        return Completed(command, 0, output, "")


def test_adopting_jobs_asks_only_for_the_users_own_jobs() -> None:
    """find_jobs lists the user's jobs with ``qstat -u``, then ``qstat -j`` of those ids only, and
    keeps those whose output goes to this session's directory."""
    session = "/h/.sheepdog-executor/s1"
    own = (
        "<job_info><queue_info>"
        + "".join(f"<job_list><JB_job_number>{j}</JB_job_number></job_list>" for j in ("11", "12", "11"))
        + "</queue_info></job_info>"
    )
    details = (
        "<detailed_job_info><djob_info>"
        + _qstat_j_element("11", "me", f"{session}/task-$JOB_ID-$TASK_ID.out")
        + _qstat_j_element("12", "me", "/tmp/x.out")
        + _qstat_j_element("13", "other", f"{session}/task-$JOB_ID-$TASK_ID.out")  # never ours
        + "</djob_info></detailed_job_info>"
    )
    shell = ScriptedShell([("id -un", f"me\n{own}"), ("qstat -j", details)])
    scheduler = GridEngineScheduler(shell, JobOptions())
    assert scheduler.find_jobs(WorkerLaunch(session, "http://h:1")) == ["11"]
    assert shell.commands == ['id -un && qstat -xml -u "$(id -un)"', "qstat -j 11,12 -xml 2>/dev/null"]
    assert not any('"*"' in command for command in shell.commands)
    empty = ScriptedShell([("id -un", "me\n<job_info><queue_info/></job_info>")])
    assert GridEngineScheduler(empty, JobOptions()).find_jobs(WorkerLaunch(session, "x")) == []
    assert len(empty.commands) == 1  # no qstat -j at all without jobs


@pytest.mark.parametrize(
    ("scheduler_class", "command", "printed"),
    [(GridEngineScheduler, "qsub", "42.1-3:1"), (SlurmScheduler, "sbatch", "42;sheepdog")],
)
def test_submit_reads_the_job_id_or_says_what_the_command_said(
    scheduler_class: type[Scheduler], command: str, printed: str
) -> None:
    """The job id from the last line the submit command prints; when it fails or prints no id, a
    SchedulerError with its exit status and what it said."""
    launch = WorkerLaunch("/h/s1", "http://h:1")

    def submit(fake: str) -> str:
        scheduler = scheduler_class(LocalShell(), JobOptions(), command_setup=f"{command}() {{ {fake}; }}")
        return scheduler.submit(launch, 3)

    assert submit(f"cat >/dev/null; echo notice; echo '{printed}'") == "42"
    with pytest.raises(SchedulerError, match=rf"^{command} on .* failed \(exit 1\): denied$"):
        submit("cat >/dev/null; echo denied >&2; return 1")
    with pytest.raises(SchedulerError, match=rf"^{command} on .* failed \(exit 0\): no id here$"):
        submit("cat >/dev/null; echo no id here")
    with pytest.raises(SchedulerError, match=rf"^{command} on .* failed \(exit 0\): $"):
        submit("cat >/dev/null")


def _result(item_id: int, attempt: int, value: Any) -> Result:
    return Result(item_id, attempt, True, cloudpickle.dumps(value), "", 0.001)


@pytest.fixture
def make_dispatcher() -> Iterator[Callable[..., Dispatcher]]:
    """Dispatchers with their results thread running, each closed (the thread joined) after."""
    made: list[Dispatcher] = []

    def make(**options: Any) -> Dispatcher:
        made.append(Dispatcher(**options))
        made[-1].start()
        return made[-1]

    yield make
    for dispatcher in made:
        dispatcher.close()


def _hello(dispatcher: Dispatcher, name: str) -> None:
    reply = dispatcher.hello({"worker": name, "job": "1", "task": 1, "host": "n1", "python": [3, 11, 0]})
    assert "error" not in reply


def test_late_or_replayed_results_never_resolve_twice(make_dispatcher: Callable[..., Dispatcher]) -> None:
    dispatcher = make_dispatcher(retries=1, idle_timeout=60, python=(3, 11), max_workers=2)
    future: Future[Any] = Future()
    dispatcher.add(abs, [((-1,), {})], [future])
    _hello(dispatcher, "w1")
    reply = dispatcher.exchange("w1", [])
    assert reply is not None and len(reply["items"]) == 1
    item_id, attempt = reply["items"][0][:2]
    # w1 is declared lost; the call is retried by w2
    lost = dispatcher.take_lost("w1")
    assert dispatcher.retry_or_split(lost) == (lost, [])
    _hello(dispatcher, "w2")
    reply2 = dispatcher.exchange("w2", [])
    assert reply2 is not None and reply2["items"][0][1] == attempt + 1
    # w1 reports late: ignored (it is no longer a worker, and its attempt is stale)
    assert dispatcher.exchange("w1", [_result(item_id, attempt, "late")]) == {"stop": True}
    assert not future.done()
    dispatcher.exchange("w2", [_result(item_id, attempt + 1, "fresh")])
    assert future.result(timeout=1) == "fresh"
    # a replay of the same result changes nothing
    dispatcher.exchange("w2", [_result(item_id, attempt + 1, "replayed")])
    assert future.result() == "fresh"
    wait_until(lambda: dispatcher.outstanding() == 0, 5, "the call to leave the books")


def test_out_of_retries_fails_with_the_error_given(make_dispatcher: Callable[..., Dispatcher]) -> None:
    dispatcher = make_dispatcher(retries=0, idle_timeout=60, python=(3, 11))
    future: Future[Any] = Future()
    dispatcher.add(abs, [((-1,), {})], [future])
    _hello(dispatcher, "w1")
    dispatcher.exchange("w1", [])
    retried, failed = dispatcher.retry_or_split(dispatcher.take_lost("w1"))
    assert not retried and len(failed) == 1
    dispatcher.fail_items(failed, WorkerLost("gone", job_id="1", task_id=1, scheduler="Grid Engine"))
    with pytest.raises(WorkerLost, match="Grid Engine job 1, task 1"):
        future.result(timeout=1)
    assert dispatcher.stats.snapshot()["batches"][0]["failed"] == 1


def test_python_mismatch_fails_pending_calls(make_dispatcher: Callable[..., Dispatcher]) -> None:
    dispatcher = make_dispatcher(python=(3, 11))
    future: Future[Any] = Future()
    dispatcher.add(abs, [((-1,), {})], [future])
    reply = dispatcher.hello({"worker": "w", "job": "1", "task": 1, "host": "n", "python": [3, 9, 1]})
    assert "Python 3.9.1" in reply["error"]
    assert "3.9.1" in str(future.exception(timeout=1))


def test_calls_whose_reply_was_lost_are_queued_again(make_dispatcher: Callable[..., Dispatcher]) -> None:
    dispatcher = make_dispatcher(retries=0, idle_timeout=60, python=(3, 11))
    future: Future[Any] = Future()
    dispatcher.add(abs, [((-1,), {})], [future])
    _hello(dispatcher, "w1")
    lost_reply = dispatcher.exchange("w1", [])
    assert lost_reply is not None and len(lost_reply["items"]) == 1
    # the worker never got that reply: it asks again with no results; the call comes back to it
    again = dispatcher.exchange("w1", [])
    assert again is not None and again["items"][0][0] == lost_reply["items"][0][0]
    item_id, attempt = again["items"][0][:2]
    dispatcher.exchange("w1", [_result(item_id, attempt, 1)])
    assert future.result(timeout=1) == 1


def test_late_copies_of_a_workers_requests_run_no_call_twice(
    make_dispatcher: Callable[..., Dispatcher],
) -> None:
    """A client back from a suspension finds copies of a worker's requests that piled up while it
    was away (the worker sent each again on a new connection): a copy of a request the worker has
    moved past changes nothing, and a copy of its latest one gets the same calls again. Before, a
    copy without the results of calls the worker had since run queued them again: they ran twice."""
    dispatcher = make_dispatcher(retries=0, idle_timeout=60, python=(3, 11), max_workers=1)
    futures: list[Future[Any]] = [Future() for _ in range(3)]
    dispatcher.add(abs, [((-i,), {}) for i in range(3)], futures)
    dispatcher.hand_out.call_seconds = 1.0  # one call per reply
    _hello(dispatcher, "w1")
    first = dispatcher.exchange("w1", [], request=1)
    assert first is not None and len(first["items"]) == 1
    a = first["items"][0]
    second = dispatcher.exchange("w1", [_result(a[0], a[1], 0)], request=2)  # the worker ran a
    assert second is not None and len(second["items"]) == 1
    b = second["items"][0]
    # late copies of request 1 (the worker has its answer and ran a and b meanwhile)
    assert dispatcher.exchange("w1", [], request=1) == {"items": []}
    # a copy of request 2 whose answer the worker never got: the same call, the same attempt
    assert dispatcher.exchange("w1", [_result(a[0], a[1], 0)], request=2) == second
    third = dispatcher.exchange("w1", [_result(b[0], b[1], 1)], request=3)
    assert third is not None and third["items"][0][0] not in (a[0], b[0])
    c = third["items"][0]
    dispatcher.exchange("w1", [_result(c[0], c[1], 2)], request=4)
    assert [f.result(timeout=1) for f in futures] == [0, 1, 2]
    assert dispatcher.stats.snapshot()["batches"][0]["retried"] == 0
    assert all(item[1] == 1 for item in (a, b, c))  # each call handed out once


def test_a_cancelled_call_leaves_the_queue_at_once(make_dispatcher: Callable[..., Dispatcher]) -> None:
    from sheepdog_executor.callfuture import CallFuture

    dispatcher = make_dispatcher(python=(3, 11))
    futures = [CallFuture() for _ in range(3)]
    dispatcher.add(abs, [((-1,), {})] * 3, futures)
    assert futures[1].cancel() and futures[1].cancel()  # twice: counted once
    assert dispatcher.counts() == (2, 0) and dispatcher.outstanding() == 2
    _hello(dispatcher, "w1")
    reply = dispatcher.exchange("w1", [])
    assert reply is not None
    handed = [item[0] for item in reply["items"]]
    while len(handed) < 2:
        more = dispatcher.exchange("w1", [_result(i, 1, 0) for i in handed[-1:]])
        assert more is not None
        handed += [item[0] for item in more.get("items", [])]
    assert handed == [1, 3]
    assert dispatcher.stats.snapshot()["batches"][0]["cancelled"] == 1


def test_qstat_error_state_is_not_queued() -> None:
    text = QSTAT.replace("<state>qw</state>", "<state>Eqw</state>")
    assert parse_qstat_xml(text, {"7"})["7"][3] is TaskState.ERROR


class _HoldsALock:
    def __init__(self) -> None:
        self.guard = threading.Lock()


def test_what_cannot_be_pickled_is_named_with_its_path() -> None:
    holder = _HoldsALock()
    with pytest.raises(PicklingFailed, match=r"\(args, kwargs\)\[0\]\[1\]\['k'\]\.guard \(lock\) cannot be"):
        pickling.dumps(((1, {"k": holder}), {}))
    with LocalExecutor(max_workers=1) as executor:

        def submits_more(x: int) -> Any:
            return executor.submit(abs, x)

        with pytest.raises(PicklingFailed) as info:
            executor.submit(submits_more, 1)
    message = str(info.value)
    assert message.startswith("cannot send the function ")
    assert (
        "submits_more -> closure variable 'executor' is a LocalExecutor, and an executor cannot travel"
        in message
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("job_name", "sweep\nrm -rf ~"),
        ("queue", "all.q\r"),
        ("working_directory", "/tmp/x\x00y"),
        ("resources", {"h_vmem": "2G\ntouch /tmp/pwned"}),
        ("resources", {"h_vmem\n": "2G"}),
        ("resources", ["h_rt=1:00:00\x1b[2J"]),
        ("qsub_args", ["-P", "proj\ntouch /tmp/pwned"]),
        ("setup", ["module load python\ntouch /tmp/pwned"]),
        ("setup", "source venv/bin/activate\r"),
        ("python", "python3\x7f"),
        ("parallel_environment", "smp\n"),
    ],
)
def test_control_characters_in_job_options_are_refused_naming_the_option(option: str, value: Any) -> None:
    """A newline in any option that reaches the job script would start a line of its own there;
    refused before anything connects (the host need not exist)."""
    extra = {"slots": 2} if option == "parallel_environment" else {}
    with pytest.raises(ConfigurationError, match=rf"^{option}= contains the control character"):
        GridEngineExecutor(host="no-such-host.invalid", **{option: value}, **extra)


def test_a_tab_in_a_setup_line_is_indentation_not_an_injection() -> None:
    options = JobOptions(setup=("if true; then", "\techo ok", "fi"))
    assert "\techo ok" in GridEngineScheduler(LocalShell(), options).render(
        WorkerLaunch("/s", "http://h:1"), 1
    )
    with pytest.raises(ConfigurationError, match="^job_name="):
        JobOptions(job_name="a\tb")


def test_session_root_must_be_the_users_and_its_ancestors_the_users_or_roots() -> None:
    """As OpenSSH's StrictModes: (owner, mode) of the root, then of each directory above it."""
    me, other = 1001, 1002
    assert unsafe_part(me, "/home/u/.s", [(me, 0o700), (me, 0o755), (0, 0o755), (0, 0o755)]) is None
    assert unsafe_part(me, "/tmp/mine", [(me, 0o700), (0, 0o1777), (0, 0o755)]) is None  # sticky /tmp
    for modes, why in (
        ([(other, 0o1777), (0, 0o1777), (0, 0o755)], "/tmp/mine is owned by uid 1002, not by you (uid 1001)"),
        ([(me, 0o777), (0, 0o1777), (0, 0o755)], "/tmp/mine is writable by group or others (mode 777)"),
        ([(me, 0o770), (0, 0o1777), (0, 0o755)], "/tmp/mine is writable by group or others (mode 770)"),
    ):
        assert unsafe_part(me, "/tmp/mine", modes) == why
    # a directory above it that another user owns, or that others may write and is not sticky
    assert "/tmp, which contains it, is owned by uid 1002" in str(
        unsafe_part(me, "/tmp/mine", [(me, 0o700), (other, 0o1777), (0, 0o755)])
    )
    assert "/home/u, which contains it, is writable by group or others (mode 777) and not sticky" in str(
        unsafe_part(me, "/home/u/.s", [(me, 0o700), (me, 0o777), (0, 0o755), (0, 0o755)])
    )


@pytest.mark.parametrize(
    ("setup", "stdout", "failure"),
    [
        (["x=1", "export Y=$x", "if true; then", "\techo in-if $Y", "fi"], "in-if 1\nworker\n", None),
        (["echo one", "false", "echo never"], "one\n", SetupFailure(2, 1, "false")),
        (["exit 99"], "", SetupFailure(1, 99, "exit 99")),  # never exit 99: Grid Engine would requeue
        (["if true; then", "\tfalse", "fi", "echo never"], "", SetupFailure(1, 1, "if true; then")),
    ],
)
def test_setup_lines_run_in_order_and_stop_at_the_first_failure(
    setup: list[str], stdout: str, failure: SetupFailure | None
) -> None:
    script = with_setup(JobOptions(setup=tuple(setup), setup_shell="bash"), "echo worker")
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=False, timeout=30)
    assert (done.stdout, setup_failure(done.stderr)) == (stdout, failure)
    assert done.returncode == (0 if failure is None else SETUP_FAILED_EXIT)


def test_result_parts_are_joined_once_each_and_a_missing_one_is_an_error() -> None:
    parts = ResultParts()
    value = pickle.dumps(b"abcdefghij")
    total = len(value)
    for offset in [*range(0, total, 8), 8]:  # a part sent again (its answer lost) counts once
        assert parts.add("w", 1, 1, offset, total, value[offset : offset + 8])
    assert not parts.add("w", 1, 1, 16, total, b"x" * 64)  # past the end
    joined = parts.join("w", Result(1, 1, True, b"", "out", 0.5, "err", total))
    assert pickle.loads(joined.data) == b"abcdefghij"
    assert (joined.stdout, joined.seconds, joined.stderr, joined.parted) == ("out", 0.5, "err", 0)
    assert parts.add("w", 2, 1, 0, total, value[:8])
    failed = parts.join("w", Result(2, 1, True, b"", "", 0.1, "", total))
    assert failed.ok is False
    assert Error(*pickle.loads(failed.data)).traceback.endswith(
        f"({total} bytes pickled) reached the client incomplete (8 bytes)"
    )


def test_owner_and_mode_are_read_from_ls() -> None:
    assert owner_and_mode("drwxrwxrwt 12 0 0 4096 Dec  2 13:00 /tmp") == (0, 0o41777)
    assert owner_and_mode("drwx------+ 2 1001 1001 4096 Dec  2 13:00 /x") == (1001, 0o40700)
    assert owner_and_mode("drwxrwx--T 2 1002 1002 40 Dec  2 13:00 /y") == (1002, 0o41770)
    with pytest.raises(ValueError):
        owner_and_mode("ls: cannot access '/z': No such file or directory")


def test_a_set_up_that_fails_leaves_no_thread_behind(tmp_path: Any) -> None:
    """An executor whose set-up is refused (here: a session root others could write) ends every
    thread it started: the results thread used to outlive it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    before = set(threading.enumerate())
    with pytest.raises(ConfigurationError, match="session_root"):
        LocalExecutor(max_workers=1, session_root=str(shared))
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("sheepdog")]
    assert left == []


def test_result_parts_refuse_a_total_beyond_the_limit_and_free_a_lost_workers() -> None:
    parts = ResultParts(limit=lambda: 100)
    assert not parts.add("w", 1, 1, 0, 101, b"x" * 8) and parts.held() == 0  # nothing allocated
    refused = parts.join("w", Result(1, 1, True, b"", "", 0.1, "", 101))
    assert refused.ok is False and "(101 bytes pickled) is larger than the client can take" in (
        Error(*pickle.loads(refused.data)).message
    )
    assert parts.add("w", 2, 1, 0, 60, b"x" * 8) and parts.held() == 60
    assert not parts.add("v", 1, 1, 0, 60, b"x" * 8)  # 52 bytes promised to w's result are not free
    parts.forget("w")
    assert parts.held() == 0 and not parts.add("w", 3, 1, 0, 8, b"x" * 8)  # a lost worker's late part
