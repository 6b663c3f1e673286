"""A worker's routes to its client and its patience (``remote/reach.py``), against a real endpoint
on this machine: no cell needed."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.remote import worker
from sheepdog_executor.remote.reach import Reach
from sheepdog_executor.server import Endpoint

SECRET = os.urandom(32).hex().encode()


@pytest.fixture
def endpoints() -> Iterator[list[Endpoint]]:
    made = [Endpoint(Dispatcher(), SECRET, address="127.0.0.1") for _ in range(2)]
    for endpoint in made:
        endpoint.start()
    yield made
    for endpoint in made:
        endpoint.stop()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_first_route_that_answers_is_taken_and_the_routes_file_followed(
    endpoints: list[Endpoint], tmp_path: Path
) -> None:
    routes = tmp_path / "routes"
    first, second = (f"http://127.0.0.1:{e.port}" for e in endpoints)
    routes.write_text(f"direct http://127.0.0.1:{closed_port()}\ntunnel {first}\n")
    channel = worker.Channel(Reach(first, str(routes)), SECRET)
    assert channel.call("/heartbeat", {"worker": "w"}) == {"known": False}
    assert channel.reach.current == ("tunnel", first)
    # the relay moved: the file says where, the old address is gone
    routes.write_text(f"tunnel {second}\n")
    endpoints[0].stop()
    assert channel.call("/heartbeat", {"worker": "w"}) == {"known": False}
    assert channel.reach.current == ("tunnel", second)


def test_a_worker_gives_up_once_the_client_was_away_longer_than_the_tolerance(tmp_path: Path) -> None:
    reach = Reach(f"http://127.0.0.1:{closed_port()}", str(tmp_path / "routes"))
    reach.contacted()
    reach.set_tolerance(1.0)
    with pytest.raises(worker.ClientUnreachable, match="unreachable for [12] s"):
        worker.Channel(reach, SECRET).call("/heartbeat", {"worker": "w"})
