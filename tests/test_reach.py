"""A worker's routes to its client and its patience (``remote/reach.py``), against a real endpoint
on this machine: no cell needed."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.errors import BrokenGridEngineExecutor, ConnectionFailed
from sheepdog_executor.jobs import JobManager
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.meter import CommandMeter
from sheepdog_executor.remote import reach, worker
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


def test_a_worker_leaves_a_route_the_routes_file_no_longer_lists_although_it_answers(
    endpoints: list[Endpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an SSH drop another user may hold the relay's old port and pass the traffic on to the
    new relay: signed answers keep coming there, but the worker goes where the routes file says."""
    monkeypatch.setattr(reach, "ROUTES_CHECK_SECONDS", 0.0)
    routes = tmp_path / "routes"
    first, second = (f"http://127.0.0.1:{e.port}" for e in endpoints)
    routes.write_text(f"tunnel {first}\n")
    channel = worker.Channel(Reach(first, str(routes)), SECRET)
    assert channel.call("/heartbeat", {"worker": "w"}) == {"known": False}
    routes.write_text(f"tunnel {second}\n")  # endpoints[0] still answers, signed
    assert channel.call("/heartbeat", {"worker": "w"}) == {"known": False}
    assert channel.reach.current == ("tunnel", second)
    assert channel._url == second
    channel.close()


def test_a_worker_gives_up_once_the_client_was_away_longer_than_the_tolerance(tmp_path: Path) -> None:
    reach = Reach(f"http://127.0.0.1:{closed_port()}", str(tmp_path / "routes"))
    reach.contacted()
    reach.set_tolerance(1.0)
    with pytest.raises(worker.ClientUnreachable, match="unreachable for [12] s"):
        worker.Channel(reach, SECRET).call("/heartbeat", {"worker": "w"})


class _Unreachable:
    """A scheduler whose head node never answers (its commands counted as a scheduler's are)."""

    meter = CommandMeter()

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionFailed("cannot reach the head node (the test says so)")

        return fail


def test_the_client_gives_up_on_a_cluster_unreachable_for_twice_the_tolerance() -> None:
    dispatcher = Dispatcher()
    future: Future[Any] = Future()
    dispatcher.add(abs, [((-1,), {})], [future])
    manager = JobManager(
        _Unreachable(),  # type: ignore[arg-type]
        dispatcher,
        WorkerLaunch("/nowhere", "http://127.0.0.1:1"),
        max_workers=1,
        batch_window=0,
        poll_interval=0.05,
        heartbeat_timeout=60,
        disconnect_tolerance=0.5,
    )
    manager.start()
    try:
        with pytest.raises(BrokenGridEngineExecutor, match=r"unreachable for 1 s \(more than twice"):
            future.result(timeout=30)
    finally:
        manager.stop(grace=0, timeout=0)
