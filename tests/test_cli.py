"""The ``sheepdog-executor`` command on the real cell: doctor's checks and where they stop, and
cleanup of jobs left by a client killed with SIGKILL (and only of those)."""

from __future__ import annotations

import http.server
import json
import re
import secrets
import shlex
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import NODE_PYTHON, our_jobs, require_up, slurm_jobs, ssh, wait_until

from sheepdog_executor import GridEngineExecutor, SlurmExecutor, __version__
from sheepdog_executor.cli import main
from sheepdog_executor.cli.cleanup import ENDPOINT_RECORD
from sheepdog_executor.config import CONFIG_ENV, OPTIONS, env_name
from sheepdog_executor.sessiondir import OWNER_RECORD
from sheepdog_executor.testing import internals

CHECKS = ("config", "ssh", "scheduler", "python", "callback")

#: A client that starts one long call, reports where it runs, then waits to be killed.
ABANDONED_CLIENT = """
import json, sys, time
from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.testing import internals
host, root, report, callback = sys.argv[1:]
executor = GridEngineExecutor(
    host=host, max_workers=1, session_root=root, poll_interval=0.5, callback=callback
)
future = executor.submit(time.sleep, 900)
deadline = time.monotonic() + 60
while not (executor.job_ids and future.running()) and time.monotonic() < deadline:
    time.sleep(0.2)
info = {"session_dir": executor.session_dir, "jobs": executor.job_ids, "url": internals(executor).launch.url}
with open(report + ".tmp", "w") as handle:
    json.dump(info, handle)
import os; os.rename(report + ".tmp", report)
time.sleep(3600)
"""


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty config file of our own; no SHEEPDOG_* option variable of the caller leaks in."""
    path = tmp_path / "config.toml"
    path.write_text("")
    monkeypatch.setenv(CONFIG_ENV, str(path))
    for name in OPTIONS:
        monkeypatch.delenv(env_name(name), raising=False)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def statuses(out: str) -> dict[str, str]:
    """check name -> "ok" / "FAIL" from doctor's output."""
    found = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("ok", "FAIL") and words[1] in CHECKS:
            found[words[1]] = words[0]
    return found


# -- the command itself ----------------------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"sheepdog-executor {__version__}\n")
    done = subprocess.run(
        [sys.executable, "-m", "sheepdog_executor.cli", "--version"], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"sheepdog-executor {__version__}")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["doctor"]) == 2
    assert "HOST" in capsys.readouterr().err


# -- doctor ----------------------------------------------------------------------------------------
@pytest.mark.cluster
def test_doctor_passes_on_the_cell(cell: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "doctor", cell)
    assert code == 0, out
    assert statuses(out) == dict.fromkeys(CHECKS, "ok")
    assert "all checks passed" in out
    assert re.search(r"ok +python +Python 3\.\d+\.\d+ in test job \d+ on \S+", out)


def test_doctor_unreachable_host_stops_at_ssh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host nowhere\n  HostName 127.0.0.1\n  Port 1\n")
    monkeypatch.setenv("SHEEPDOG_SSH_CONFIG", str(ssh_config))
    code, out = run(capsys, "doctor", "nowhere")
    assert code == 1
    assert statuses(out) == {"config": "ok", "ssh": "FAIL"}  # and nothing after the failure
    assert "cannot reach nowhere" in out and "127.0.0.1:1" in out
    assert re.search(r"fix: +check HostName and Port of nowhere \(`ssh -G nowhere`", out)


@pytest.mark.cluster
def test_doctor_missing_python_stops_at_python(cell: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "doctor", cell, "--python", "/nonexistent/python")
    assert code == 1
    assert statuses(out) == {"config": "ok", "ssh": "ok", "scheduler": "ok", "python": "FAIL"}
    assert "/nonexistent/python did not run in test job" in out and "not found" in out
    assert re.search(r"fix: +pass --python \(python = in the config file\) the path of a Python 3\.", out)
    job = re.search(r"test job (\d+)", out)
    assert job and not our_jobs({job.group(1)})


@pytest.mark.cluster
def test_doctor_callback_address_not_on_this_machine(
    cell: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SHEEPDOG_CALLBACK", "direct")  # auto would fall back to the tunnel
    code, out = run(capsys, "doctor", cell, "--callback-address", "192.0.2.1")
    assert code == 1
    assert statuses(out)["callback"] == "FAIL"
    assert "cannot listen on 192.0.2.1" in out and "fix:" in out


@pytest.fixture
def sitecustomize(cell: str) -> Iterator[Callable[[str], str]]:
    """Set-up lines for jobs whose Python first runs the given code (a sitecustomize module)."""
    base = f"sd-cli-test-{secrets.token_hex(4)}"
    made: list[str] = []

    def make(code: str) -> str:
        directory = f"{base}/{len(made)}"
        made.append(directory)
        ssh(f"mkdir -p {directory} && cat > {directory}/sitecustomize.py <<'EOF'\n{code}\nEOF")
        return f"export PYTHONPATH=$HOME/{directory}"

    yield make
    ssh(f"rm -rf {base}")


@pytest.mark.cluster
def test_doctor_python_of_another_minor_version_fails_at_python(
    cell: str, config: Path, sitecustomize: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    setup = sitecustomize('import sys\nsys.version_info = (3, 9, 18, "final", 0)')
    config.write_text(f'[default]\nsetup = ["{setup}"]\n')
    code, out = run(capsys, "doctor", cell)
    assert code == 1
    assert statuses(out)["python"] == "FAIL" and "callback" not in statuses(out)
    assert re.search(r"the nodes run Python 3\.9\.18 \(python3 in test job \d+ on \S+\), this client", out)
    assert re.search(r"fix: +pickled calls only travel between equal minor versions", out)


@pytest.mark.cluster
def test_doctor_job_in_error_state_fails_at_python(
    cell: str, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text('[default]\nworking_directory = "/nonexistent/workdir"\n')
    code, out = run(capsys, "doctor", cell)
    assert code == 1
    assert statuses(out)["python"] == "FAIL" and "callback" not in statuses(out)
    job = re.search(r"the test job (\d+) is in error state: .*/nonexistent/workdir", out)
    assert job, out
    assert re.search(r"fix: +check that working_directory exists on the nodes", out)
    assert gone([job.group(1)])


BLOCKED = {  # the worker's connections to the client: refused, or never answered
    "refuse": 'raise ConnectionRefusedError(111, "Connection refused (blocked by the test)")',
    "hang": "time.sleep(3600)",
}


@pytest.mark.cluster
@pytest.mark.parametrize(("how", "timeout"), [("refuse", "90"), ("hang", "12")])
def test_doctor_nodes_that_cannot_call_back_fail_at_callback(
    cell: str,
    config: Path,
    sitecustomize: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    how: str,
    timeout: str,
) -> None:
    setup = sitecustomize(
        f"import socket, time\ndef blocked(*a, **k):\n    {BLOCKED[how]}\nsocket.create_connection = blocked"
    )
    config.write_text(f'[hosts."{cell}"]\ncallback = "direct"\nsetup = ["{setup}"]\n')
    code, out = run(capsys, "doctor", cell, "--timeout", timeout)
    assert code == 1
    assert statuses(out) == {**dict.fromkeys(CHECKS[:-1], "ok"), "callback": "FAIL"}
    if how == "refuse":  # the worker gives up: WorkerStartFailed, with the task's stderr
        assert "never came back directly to" in out and "blocked by the test" in out
    else:  # the worker hangs: doctor's timeout, and what the job was doing
        assert re.search(r"test job \d+ ran, but no answer came back directly to .* within 12 s", out)
    assert re.search(r"fix: +the nodes must open TCP connections to this machine", out)
    jobs = set(re.findall(r"(?:Grid Engine job|test job) (\d+)", out))
    assert jobs and not our_jobs(jobs)


# -- cleanup ---------------------------------------------------------------------------------------
@dataclass
class Abandoned:
    """A client killed with SIGKILL while its call ran: its job and session directory remain."""

    session_dir: str
    jobs: list[str]
    url: str

    @property
    def name(self) -> str:
        return self.session_dir.rsplit("/", 1)[1]


@pytest.fixture
def created_jobs(cell: str) -> Iterator[list[str]]:
    """Ids of the jobs a test made; whatever cleanup left of them is removed after the test."""
    jobs: list[str] = []
    yield jobs
    if jobs:
        ssh("qdel " + " ".join(jobs) + " >/dev/null 2>&1")


@pytest.fixture
def session_root(cell: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A session root of this test only, so cleanup never sees other people's sessions."""
    home = ssh('printf %s "$HOME"').stdout.strip()
    assert home.startswith("/")
    root = f"{home}/.sheepdog-executor-test-{secrets.token_hex(4)}"
    monkeypatch.setenv("SHEEPDOG_SESSION_ROOT", root)
    yield root
    ssh(f"rm -rf {root}")


@pytest.fixture
def abandon(
    cell: str, session_root: str, created_jobs: list[str], tmp_path: Path
) -> Iterator[Callable[..., Abandoned]]:
    """Start a client in a subprocess, wait until its call runs, kill it with SIGKILL."""
    children: list[subprocess.Popen[bytes]] = []

    def make(callback: str = "auto") -> Abandoned:
        report = tmp_path / f"client-{len(children)}.json"
        child = subprocess.Popen(
            [sys.executable, "-c", ABANDONED_CLIENT, cell, session_root, str(report), callback],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        children.append(child)
        deadline = time.monotonic() + 120
        while not report.exists():
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the client did not start its job"
            time.sleep(0.2)
        child.kill()
        child.wait()
        info = Abandoned(**json.loads(report.read_text()))
        created_jobs.extend(info.jobs)
        assert set(our_jobs(set(info.jobs))) == set(info.jobs), "the job went with its client"
        return info

    yield make
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def client_elsewhere(session_dir: str) -> None:
    """Make a session's owner record say its client ran on another machine: cleanup must then ask
    the client's endpoint, as it does for a laptop's session."""
    pattern = 's/"client_host": "[^"]*"/"client_host": "elsewhere"/'
    ssh(f"sed -i {shlex.quote(pattern)} {session_dir}/{OWNER_RECORD}")


def write_record(session_dir: str, url: str) -> None:
    """The endpoint record the executor is to write at start (written here until it does)."""
    ssh(f"test -e {session_dir}/{ENDPOINT_RECORD} || echo {url} > {session_dir}/{ENDPOINT_RECORD}")


def gone(job_ids: list[str], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while our_jobs(set(job_ids)):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def exists(path: str) -> bool:
    return ssh(f"test -e {path}").returncode == 0


@pytest.mark.cluster
@pytest.mark.parametrize("callback", ["direct", "tunnel"])
def test_cleanup_removes_the_job_of_a_killed_client(
    cell: str,
    session_root: str,
    created_jobs: list[str],
    abandon: Callable[..., Abandoned],
    capsys: pytest.CaptureFixture[str],
    callback: str,
) -> None:
    left = abandon(callback)
    write_record(left.session_dir, left.url)
    # a stale session directory of this cluster without jobs, whose client (elsewhere) is gone
    stale = f"{session_root}/20260101-000000-0123abcd"
    ssh(f"mkdir -p {stale} && touch {stale}/secret && echo http://127.0.0.1:1 > {stale}/{ENDPOINT_RECORD}")
    ssh(f"cp {left.session_dir}/{OWNER_RECORD} {stale}/")
    client_elsewhere(stale)
    # a job whose session directory is gone: stuck in error state (Eqw), of no use to anyone
    orphan = ssh(
        f"printf '#$ -N sheepdog\\n#$ -o {session_root}/20260101-000000-deadbeef/task-$JOB_ID-$TASK_ID.out"
        "\\n#$ -e /dev/null\\ntrue\\n' | qsub -terse"
    ).stdout.strip()
    assert orphan.isdigit()
    created_jobs.append(orphan)

    code, out = run(capsys, "cleanup", cell, "--dry-run")
    assert code == 0
    removal = f"{left.name}: job {left.jobs[0]} (sheepdog) and the directory; its client (pid"
    assert f"would remove {removal}" in out
    assert "would remove 20260101-000000-0123abcd: the directory; its client is gone" in out
    assert (
        f"would remove 20260101-000000-deadbeef: job {orphan} (sheepdog); its session directory is gone"
        in out
    )
    assert set(our_jobs({*left.jobs, orphan})) == {*left.jobs, orphan}  # a dry run removes nothing
    assert exists(left.session_dir)

    code, out = run(capsys, "cleanup", cell)
    assert code == 0
    assert f"removed {removal}" in out
    assert gone([*left.jobs, orphan])
    assert not exists(left.session_dir) and not exists(stale)


@pytest.mark.cluster
def test_cleanup_keeps_live_clients_and_unchecked_sessions(
    cell: str,
    session_root: str,
    abandon: Callable[..., Abandoned],
    make_executor: Callable[..., GridEngineExecutor],
    capsys: pytest.CaptureFixture[str],
) -> None:
    live = make_executor(max_workers=1, session_root=session_root)
    call = live.submit(time.sleep, 15)
    deadline = time.monotonic() + 60
    while not live.job_ids and time.monotonic() < deadline:
        time.sleep(0.2)
    write_record(live.session_dir, internals(live).launch.url)
    client_elsewhere(live.session_dir)  # so that its endpoint is asked
    unchecked = abandon()
    # as left by a client of an older version, without the records
    ssh(f"rm -f {unchecked.session_dir}/{ENDPOINT_RECORD} {unchecked.session_dir}/{OWNER_RECORD}")
    live_name = live.session_dir.rsplit("/", 1)[1]

    code, out = run(capsys, "cleanup", cell)
    assert code == 0
    assert re.search(rf"kept {live_name}: job \d+ \(sheepdog\); its client is alive", out)
    assert f"kept {unchecked.name}: job {unchecked.jobs[0]} (sheepdog); cannot tell" in out
    assert "--force removes it" in out
    assert set(our_jobs({*live.job_ids, *unchecked.jobs})) == {*live.job_ids, *unchecked.jobs}

    code, out = run(capsys, "cleanup", cell, "--force")
    assert code == 0
    assert f"removed {unchecked.name}: job {unchecked.jobs[0]} (sheepdog) and the directory" in out
    assert gone(unchecked.jobs)
    assert set(our_jobs(set(live.job_ids))) == set(live.job_ids) and exists(live.session_dir)
    assert call.result(timeout=60) is None  # the live client never noticed


@pytest.mark.cluster
@pytest.mark.multihost
def test_cleanup_keeps_a_live_session_of_another_cluster_on_the_shared_home(
    cell: str,
    slurm_cell: str,
    session_root: str,
    abandon: Callable[..., Abandoned],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """/home is shared by the three cells: a live Slurm session is seen by the cleanup of the
    multi-host Grid Engine cell (another head node, from which its endpoint is unreachable) and of
    the Grid Engine cell on its own head node; both keep it and say why. A dead Grid Engine session
    is kept by the other cell's cleanup and removed by its own."""
    multi = require_up(
        "fear-multi",
        "qstat -f",
        lambda out: "all.q@" in out,
        "multi-host cell",
        "scripts/test-cell.sh --multi-host",
    )
    dead = abandon()
    client_elsewhere(dead.session_dir)  # only its endpoint (refused) can tell it is dead
    with SlurmExecutor(
        host=slurm_cell, max_workers=1, session_root=session_root, poll_interval=0.5, python=NODE_PYTHON
    ) as live:
        call = live.submit(time.sleep, 10)
        wait_until(lambda: live.job_ids, 60, "the Slurm job's submission")
        client_elsewhere(live.session_dir)  # so the cluster, not this machine's pid, decides
        name = live.session_dir.rsplit("/", 1)[1]
        kept = f"kept {name}: no jobs; session of another cluster (Slurm on host "
        for argv in (["--dry-run"], []):
            code, out = run(capsys, "cleanup", multi, *argv)
            assert code == 0, out
            assert kept in out and "this is Grid Engine on mh-head" in out
            assert f"kept {dead.name}: no jobs; session of another head node (Grid Engine on host " in out
            assert exists(f"{live.session_dir}/secret") and exists(f"{dead.session_dir}/secret")
        code, out = run(capsys, "cleanup", cell, "--dry-run")
        assert code == 0 and kept in out, out
        assert f"would remove {dead.name}: job {dead.jobs[0]} (sheepdog) and the directory" in out
        code, out = run(capsys, "cleanup", cell)
        assert code == 0 and kept in out, out
        assert (
            f"removed {dead.name}: job {dead.jobs[0]} (sheepdog) and the directory; its client is gone" in out
        )
        assert exists(f"{live.session_dir}/secret") and exists(f"{live.session_dir}/bundle.zip")
        assert not exists(dead.session_dir)
        assert slurm_jobs(set(live.job_ids)), "the live session's job is still there"
        assert call.result(timeout=60) is None  # the live client never noticed


class _Impostor(http.server.BaseHTTPRequestHandler):
    """An unrelated web server: answers every POST with 200 and a body of its own."""

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"hi\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.cluster
def test_cleanup_is_not_fooled_by_another_program_on_a_dead_clients_port(
    cell: str, session_root: str, abandon: Callable[..., Abandoned], capsys: pytest.CaptureFixture[str]
) -> None:
    """Liveness is a challenge signed with the session's secret and an answer signed for it: a
    listener that took the dead client's port (and answers HTTP) does not keep its session."""
    left = abandon("direct")
    client_elsewhere(left.session_dir)
    port = urllib.parse.urlsplit(left.url).port
    assert port is not None
    impostor = http.server.ThreadingHTTPServer(("0.0.0.0", port), _Impostor)
    thread = threading.Thread(target=impostor.serve_forever, name="impostor", daemon=True)
    thread.start()
    try:
        code, out = run(capsys, "cleanup", cell)
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert code == 0
    assert f"removed {left.name}: job {left.jobs[0]} (sheepdog) and the directory; its client is gone" in out
    assert "not signed with the session's secret" in out
    assert gone(left.jobs)
