"""The SSH shell on the real cell: its connection, files it puts, commands run at the same time."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from sheepdog_executor.shell import SSHShell, SSHTarget

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
