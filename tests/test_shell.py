"""The SSH shell on the real cell: its connection, files it puts, commands run at the same time."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import NODE_PYTHON, own_sshd_config, wait_until

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.errors import CommandTimedOut
from sheepdog_executor.shell import TIMED_OUT, LocalShell, SSHShell, SSHTarget, bounded

pytestmark = pytest.mark.cluster


@pytest.fixture
def shell(cell: str) -> Iterator[SSHShell]:
    made = SSHShell(SSHTarget.resolve(cell))
    yield made
    made.close()


def test_the_connection_sends_small_packets_at_once(shell: SSHShell) -> None:
    # with Nagle's algorithm each command waited for a delayed ACK: 40 ms, whatever the link
    sock = shell.transport().sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_put_makes_a_missing_directory_0700_and_the_file_0600(shell: SSHShell) -> None:
    home = shell.run('printf %s "$HOME"').stdout
    top = f"{home}/.sd-shell-test-{secrets.token_hex(4)}"
    try:
        shell.put(f"{top}/a/b/file", b"content", 0o600)
        shell.put(f"{top}/a/b/other", b"more", 0o600)  # its directory exists now
        listing = shell.run(f"ls -ldn {top}/a/b {top}/a/b/file {top}/a/b/other; cat {top}/a/b/file")
        lines = listing.stdout.splitlines()
        assert [line.split()[0] for line in lines[:3]] == ["drwx------", "-rw-------", "-rw-------"]
        assert lines[3] == "content"
    finally:
        shell.run(f"rm -rf {top}")


def test_commands_and_puts_at_the_same_time_on_one_connection(shell: SSHShell) -> None:
    home = shell.run('printf %s "$HOME"').stdout
    top = f"{home}/.sd-shell-test-{secrets.token_hex(4)}"
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            shell.put(f"{top}/{n}", str(n).encode(), 0o600)
            answers[n] = shell.run(f"cat {top}/{n}; echo -{n}").stdout
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        shell.run(f"rm -rf {top}")
    assert not errors
    assert answers == {n: f"{n}-{n}\n" for n in range(12)}


def test_put_replacing_a_file_leaves_the_new_content_only(shell: SSHShell, tmp_path: Path) -> None:
    home = shell.run('printf %s "$HOME"').stdout
    top = f"{home}/.sd-shell-test-{secrets.token_hex(4)}"
    try:
        for made, where in ((shell, top), (LocalShell(), str(tmp_path))):
            made.put(f"{where}/routes", b"old\n", 0o600, replace=True)
            made.put(f"{where}/routes", b"new\n", 0o600, replace=True)
            listing = made.run(f"cat {where}/routes; ls -An {where}")
            lines = listing.stdout.splitlines()
            assert lines[0] == "new" and len(lines) == 3, listing.stdout  # no routes.new left
            assert lines[2].startswith("-rw------- ") and lines[2].endswith(" routes")
    finally:
        shell.run(f"rm -rf {top}")


@pytest.fixture
def sshd_of_two_sessions(cell: str) -> Iterator[int]:
    """An sshd of our own on 127.0.0.1:2224 that allows two sessions per connection (MaxSessions)."""
    port = 2224
    path, pidfile = own_sshd_config(port, "MaxSessions 2")
    subprocess.run(["/usr/sbin/sshd", "-f", str(path)], check=True)
    try:
        wait_until(
            lambda: subprocess.run(["ssh", "-p", str(port), cell, "true"]).returncode == 0, 10, "the sshd"
        )
        yield port
    finally:
        pid = int(pidfile.read_text())
        subprocess.run(["pkill", "-P", str(pid)], check=False)  # its connections
        os.kill(pid, signal.SIGTERM)


def test_a_site_allowing_two_sessions_per_connection_gets_a_working_executor(
    cell: str, sshd_of_two_sessions: int
) -> None:
    # the relay holds one session; the set-up's commands, at once, take turns in the other
    with GridEngineExecutor(
        host=cell, port=sshd_of_two_sessions, max_workers=2, python=NODE_PYTHON
    ) as executor:
        assert list(executor.map(abs, [-1, -2, -3], timeout=120)) == [1, 2, 3]


def test_many_quick_commands_at_once_never_drop_the_connection(shell: SSHShell) -> None:
    # paramiko could send a channel's EOF after its close when the command ended first; OpenSSH
    # then ends the whole connection ("ieof packet referred to nonexistent channel")
    client = shell._client
    failures: list[BaseException] = []

    def quick() -> None:
        for _ in range(100):
            try:
                assert shell.run("true", retry=False).returncode == 0
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                failures.append(exc)

    threads = [threading.Thread(target=quick) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures
    assert shell._client is client  # never re-made


def test_a_command_that_hangs_leaves_a_connection_that_answers_as_it_is(shell: SSHShell) -> None:
    """The client's timeout of one command says nothing of the connection: it was closed and re-made."""
    client = shell._client
    with pytest.raises(CommandTimedOut, match="did not end within 2 s .the connection answers"):
        shell.run("sleep 6", timeout=2)
    assert shell._client is client
    assert shell.run("echo ok").stdout == "ok\n"


def test_a_bounded_command_that_hangs_is_ended_on_the_head_node(shell: SSHShell) -> None:
    marker = f"sheepdog-hung-{secrets.token_hex(6)}"
    script = f"sh -c 'while :; do sleep 1; done' {marker}"
    done = shell.run(bounded(script, 7), timeout=7)  # ended there after 2 s
    assert done.returncode == TIMED_OUT
    pattern = f"{marker[:-1]}[{marker[-1]}]"  # not the pgrep's own command line
    wait_until(lambda: shell.run(f"pgrep -f '{pattern}'").stdout == "", 10, "the hung command to end")
