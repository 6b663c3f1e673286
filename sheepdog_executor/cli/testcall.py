"""``doctor``'s callback check: how the workers would come back (decided once, as the executor
decides it), then one call of a real executor on one worker, and why it got no answer if it did not."""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import TYPE_CHECKING, Any

from sheepdog_executor.cli.common import CheckFailed, executor_default
from sheepdog_executor.errors import ConfigurationError, SheepdogError, WorkerStartFailed
from sheepdog_executor.jobscript import WorkerLaunch
from sheepdog_executor.scheduler import Scheduler, TaskState
from sheepdog_executor.shell import Shell

if TYPE_CHECKING:
    from sheepdog_executor.executor import ClusterExecutor
    from sheepdog_executor.tunnel import Route


def callback_route(shell: Shell, options: Mapping[str, Any]) -> tuple[Route, str, str]:
    """The route the workers would take back (``auto`` probes from the head node), how that reads,
    and what to change if no call comes back by it."""
    from sheepdog_executor.tunnel import choose_route

    address = options.get("callback_address") or shell.callback_address()
    port = int(options.get("callback_port", executor_default("callback_port")))
    mode = options.get("callback", executor_default("callback"))
    try:
        route = choose_route(shell, mode, address, port)
    except ConfigurationError as exc:
        raise CheckFailed(str(exc), "set callback to 'auto', 'direct' or 'tunnel'") from exc
    if route.mode != "direct":
        how = "through the SSH connection (tunnel and relay on the head node)"
        how += f"; a direct connection is impossible: {route.why}" if route.why else ""
        fix = (
            "the nodes must reach the relay's port on the head node: ask the admins whether a "
            'firewall between nodes and head node blocks it, or use callback = "direct" with a '
            "--callback-address of this machine the nodes can reach"
        )
        return route, how, fix
    try:  # the executor would find out too, but only after it made its session directory
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((address, port))
    except OSError as exc:
        raise CheckFailed(
            f"this client cannot listen on {address}:{port}: {exc}",
            "pass --callback-address (callback_address = in the config file) an address of "
            'this machine (see `ip -brief address`), or use callback = "tunnel"',
        ) from exc
    fix = (
        "the nodes must open TCP connections to this machine: pass --callback-address "
        "(callback_address = in the config file) an address of it they can route to and let its "
        'firewall accept them, or use callback = "tunnel" to come back through the SSH connection'
    )
    return route, f"directly to {address}", fix


def run_test_call(
    executor_class: type[ClusterExecutor],
    host: str,
    options: Mapping[str, Any],
    timeout: float,
    scheduler: Scheduler,
    how: str,
    fix: str,
) -> str:
    """One call on one worker of a real executor made with ``options``, within ``timeout``; the
    detail of the check (``how`` the call came back), or CheckFailed with ``fix``."""
    started = time.monotonic()
    try:
        executor = executor_class(host=host, **options)
    except SheepdogError as exc:
        raise CheckFailed(
            f"the executor did not start: {exc}", "fix what the message says and run doctor again"
        ) from exc
    with executor:  # leaving by an exception aborts: the job is removed at once
        future = executor.submit(socket.gethostname)
        try:
            node = future.result(timeout)
        except FuturesTimeout:
            silence = _silence(scheduler, timeout, executor.job_ids, executor.session_dir, how)
            raise CheckFailed(silence, fix) from None
        except WorkerStartFailed as exc:
            raise CheckFailed(f"the test job's worker never came back {how}:\n{exc}", fix) from exc
        except Exception as exc:
            raise CheckFailed(
                f"the test call failed: {type(exc).__name__}: {exc}",
                "fix what the message says and run doctor again",
            ) from exc
    return f"a call ran on {node} and came back {how}, {time.monotonic() - started:.1f} s after the start"


def _silence(scheduler: Scheduler, timeout: float, job_ids: list[str], session_dir: str, how: str) -> str:
    """Why a call got no answer in time: the job is queued, or runs but never calls back."""
    if not job_ids:
        return f"no job was submitted within {timeout:.0f} s"
    job_id = job_ids[-1]
    tasks = scheduler.poll([job_id]).get(job_id, {})
    if tasks and all(state is TaskState.QUEUED for state in tasks.values()):
        return (
            f"test job {job_id} was still waiting in the queue after {timeout:.0f} s; if the "
            "cluster is busy, run doctor again with a longer --timeout"
        )
    tail = scheduler.output_tail(WorkerLaunch(session_dir, ""), job_id, 1).strip()
    return f"test job {job_id} ran, but no answer came back {how} within {timeout:.0f} s" + (
        f"; stderr of the task:\n{tail}" if tail else ""
    )
