"""What a user sees when the cluster side is wrong: one clear error naming the problem, no hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import our_jobs, ssh

from sheepdog_executor import (
    ConfigurationError,
    ConnectionFailed,
    GridEngineExecutor,
    PythonVersionMismatch,
    SchedulerError,
    UnknownHostKey,
    WorkerStartFailed,
)
from sheepdog_executor.testing import internals

pytestmark = pytest.mark.cluster


def test_unreachable_host_names_host_and_port(cell: str) -> None:
    with pytest.raises(ConnectionFailed, match=r"cannot reach .*127\.0\.0\.1:1\b"):
        GridEngineExecutor(host=cell, port=1)


SILENT_PORT = """
import socket, sys, threading
from sheepdog_executor import ConnectionFailed, GridEngineExecutor
listener = socket.create_server(("127.0.0.1", 0))
accepted = []
threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
try:
    GridEngineExecutor(host="127.0.0.1", port=listener.getsockname()[1], connect_timeout=1,
                       ssh_config="/dev/null")
except ConnectionFailed as error:
    print(error)
"""


def test_a_port_that_sends_no_ssh_banner_is_one_clear_error_and_silent() -> None:
    # in a fresh interpreter: pytest's own log handlers would hide what a plain script prints
    done = subprocess.run(
        [sys.executable, "-c", SILENT_PORT], capture_output=True, text=True, timeout=60, check=True
    )
    assert "accepted the TCP connection but sent no SSH banner within 1 s" in done.stdout
    assert done.stderr == ""


def test_wrong_key_is_an_authentication_error(cell: str, tmp_path: Path) -> None:
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with pytest.raises(ConnectionFailed, match="authentication .* failed.*IdentityFile"):
        GridEngineExecutor(host=cell, key_filename=str(key))


def test_unknown_host_key_is_refused_not_accepted(cell: str, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(
        "Host otherName\n  HostName localhost\n  Port 2222\n  User sdtest\n"
        "  IdentityFile /root/.ssh/sheepdog_test_ed25519\n"
    )
    with pytest.raises(UnknownHostKey, match="not in ~/.ssh/known_hosts.*ssh-keyscan"):
        GridEngineExecutor(host="otherName", ssh_config=str(config))


def test_missing_qsub_is_named(cell: str) -> None:
    root = f"/home/sdtest/.sd-noqsub-{os.getpid()}"
    with pytest.raises(SchedulerError, match="qsub, qstat, qdel not found"):
        GridEngineExecutor(host=cell, command_setup="PATH=/nonexistent; export PATH", session_root=root)
    # the session directory, made while the commands were looked for, is gone again
    assert ssh(f"ls -A {root} 2>/dev/null").stdout.strip() == ""
    ssh(f"rmdir {root} 2>/dev/null")


def test_missing_interpreter_fails_futures_with_stderr(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(python="/opt/no/such/python3")
    futures = [executor.submit(abs, -1) for _ in range(3)]
    for future in futures:
        error = future.exception(timeout=90)
        assert isinstance(error, WorkerStartFailed)
        assert "/opt/no/such/python3" in str(error) and "not found" in str(error)
        assert error.job_id == executor.job_ids[0]
    assert not our_jobs(set(executor.job_ids))


def test_python_minor_version_mismatch_is_one_clear_error(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    # A real interpreter that reports another minor version: sitecustomize rewrites version_info.
    fake = "/home/sdtest/fake-py39"
    ssh(
        f"mkdir -p {fake} && printf 'import sys\\nsys.version_info = (3, 9, 18, \"final\", 0)\\n'"
        f" > {fake}/sitecustomize.py"
    )
    executor = make_executor(setup=[f"export PYTHONPATH={fake}"])
    futures = [executor.submit(abs, -2) for _ in range(4)]
    for future in futures:
        error = future.exception(timeout=90)
        assert isinstance(error, PythonVersionMismatch)
        assert "Python 3.9.18" in str(error) and "3.11" in str(error) and "python=" in str(error)


def test_failed_setup_leaves_no_session_directory(cell: str) -> None:
    root = f"/home/sdtest/.sd-setup-{os.getpid()}"
    with pytest.raises(ConfigurationError, match="cannot listen on 192.0.2.1.*callback_address="):
        # TEST-NET-1: not an address of this machine, so the endpoint cannot listen there
        GridEngineExecutor(host=cell, session_root=root, callback="direct", callback_address="192.0.2.1")
    assert ssh(f"ls -A {root}").stdout.strip() == ""
    ssh(f"rmdir {root}")


def test_proxyjump_from_the_ssh_config(cell: str, tmp_path: Path) -> None:
    config = tmp_path / "config"
    key = "/root/.ssh/sheepdog_test_ed25519"
    config.write_text(
        f"Host gateway\n  HostName 127.0.0.1\n  Port 2222\n  User sdtest\n  IdentityFile {key}\n"
        f"Host behind\n  HostName 127.0.0.1\n  Port 2222\n  User sdtest\n  IdentityFile {key}\n"
        "  ProxyJump gateway\n"
    )
    with GridEngineExecutor(host="behind", ssh_config=str(config), max_workers=1) as executor:
        assert executor.submit(abs, -7).result(timeout=90) == 7
        shell = internals(executor).shell
        assert shell._jump is not None and shell._jump.target.alias == "gateway"  # type: ignore[attr-defined]


def test_job_in_error_state_fails_its_calls_and_is_removed(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(working_directory="/nonexistent/dir")  # Grid Engine: Eqw, can't chdir
    futures = [executor.submit(abs, -1) for _ in range(2)]
    for future in futures:
        error = future.exception(timeout=90)
        assert isinstance(error, WorkerStartFailed)
        assert "error state" in str(error) and "/nonexistent/dir" in str(error)
        assert "working_directory=" in str(error)
    deadline = time.monotonic() + 30
    while our_jobs(set(executor.job_ids)):
        assert time.monotonic() < deadline, "the job in error state is still queued"
        time.sleep(0.5)
