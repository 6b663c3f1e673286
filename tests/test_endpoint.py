"""The endpoint against anybody on the network, in this process (no cell): forged, replayed,
malformed, oversized and fuzzed requests get a 4xx and change nothing, and a holder of the secret
never gets a 5xx. The same checks as ``test_security``'s, which run them against an executor's
endpoint on the real cell, through the route its workers use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from test_security import Client, State, check_malformed_requests, fuzz_requests, refuse_forged_and_replayed

from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.remote import protocol
from sheepdog_executor.server import Endpoint

SECRET = os.urandom(32).hex().encode()


class InProcess:
    """An endpoint on loopback and its dispatcher, with one call queued that nobody may resolve."""

    def __init__(self) -> None:
        self.dispatcher = Dispatcher(python=(3, 11))
        self.dispatcher.start()
        self.endpoint = Endpoint(self.dispatcher, SECRET, address="127.0.0.1")
        self.endpoint.start()
        self.call: Future[Any] = Future()
        self.dispatcher.add(abs, [((-1,), None)], [self.call])
        self.client = Client(f"{self.endpoint.scheme}://127.0.0.1:{self.endpoint.port}", SECRET)

    def state(self) -> State:
        """Known workers, tasks that said hello, unresolved calls (the job manager's snapshot)."""
        seen = self.dispatcher.liveness()
        return {w.id for w in seen.workers}, set(seen.tasks_seen), self.dispatcher.outstanding()

    def close(self) -> None:
        self.endpoint.stop()
        self.dispatcher.close()


@pytest.fixture
def endpoint() -> Iterator[InProcess]:
    made = InProcess()
    yield made
    made.close()


def test_forged_and_replayed_requests_get_403_and_resolve_nothing(
    endpoint: InProcess, tmp_path: Path
) -> None:
    before, refused = endpoint.state(), endpoint.endpoint.refused
    pwned = tmp_path / "pwned"
    sent = refuse_forged_and_replayed(endpoint.client, pwned)
    assert endpoint.endpoint.refused == refused + sent
    assert endpoint.state() == before
    assert not endpoint.call.done()
    assert not pwned.exists(), "an unauthenticated pickle was loaded"


def test_malformed_truncated_oversized_and_wrong_method_get_4xx(endpoint: InProcess) -> None:
    check_malformed_requests(endpoint.client, endpoint.state)
    assert not endpoint.call.done()


def test_fuzzed_requests_get_4xx_and_the_endpoint_keeps_working(endpoint: InProcess) -> None:
    fuzz_requests(endpoint.client, endpoint.state, examples=100)
    status, answer, _ = endpoint.client.signed("/heartbeat", protocol.dumps({"worker": "nobody"}))
    assert (status, protocol.loads(answer)) == (200, {"known": False})  # still answering
