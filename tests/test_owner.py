"""The owner record of a session and what cleanup concludes from it, without a cell."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sheepdog_executor.cli.cleanup import Here, SessionDir, judge_session
from sheepdog_executor.sessiondir import OWNER_RECORD, Owner, make_session_dir, this_client
from sheepdog_executor.shell import LocalShell

HERE = Here("Grid Engine", "head1")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_record_is_written_with_the_head_nodes_name(tmp_path: Path) -> None:
    shell = LocalShell()
    path = make_session_dir(shell, str(tmp_path), owner=this_client("Grid Engine"))
    line = Path(path, OWNER_RECORD).read_text()
    owner = Owner.parse(line)
    assert owner == dataclasses.replace(this_client("Grid Engine"), head_node=socket.gethostname())
    assert owner.on_this_machine() and owner.client_runs()
    assert Owner.parse("not json") is None and Owner.parse("[]") is None


def test_a_client_is_gone_when_its_pid_is_gone_or_is_another_process() -> None:
    me = this_client("Grid Engine")
    assert not dataclasses.replace(me, client_pid=dead_pid()).client_runs()
    if me.client_start:  # Linux: a reused pid is told apart by its start time
        assert not dataclasses.replace(me, client_start=str(int(me.client_start) - 1)).client_runs()
    assert not dataclasses.replace(me, client_host="elsewhere").on_this_machine()
    assert not dataclasses.replace(me, client_host="localhost").on_this_machine()


def session(**owner: Any) -> SessionDir:
    record = {**dataclasses.asdict(this_client("Grid Engine")), "head_node": "head1", **owner}
    return SessionDir("20260101-000000-00000000", None, True, Owner.parse(json.dumps(record)))


def judge(found: SessionDir, force: bool = False, has_jobs: bool = False) -> tuple[str, str]:
    return judge_session(None, "/root", found.name, found, force, HERE, has_jobs)  # type: ignore[arg-type]


@pytest.mark.parametrize("force", [False, True])
def test_sessions_of_other_clusters_and_head_nodes_are_kept_even_with_force(force: bool) -> None:
    verdict, why = judge(session(scheduler="Slurm", head_node="head1", client_host="x"), force)
    assert verdict == "keep"
    assert why.startswith("session of another cluster (Slurm on host head1; this is Grid Engine on head1)")
    verdict, why = judge(session(head_node="login2", client_host="x"), force)
    assert (verdict, why.split(" (")[0]) == ("keep", "session of another head node")


def test_a_dead_client_of_this_machine_is_proof_even_for_another_cluster() -> None:
    verdict, why = judge(session(scheduler="Slurm", client_pid=dead_pid()))
    assert verdict == "remove"
    assert why.startswith("its client (pid ") and why.endswith("are for a cleanup there")
    assert judge(session())[0] == "keep"  # this very process: alive
    assert "still runs on this machine" in judge(session())[1]


def test_an_old_session_without_a_record_or_jobs_here_is_kept_unless_forced() -> None:
    old = SessionDir("20260101-000000-00000001", "http://127.0.0.1:1", True, None)
    verdict, why = judge(old)
    assert verdict == "keep" and "no owner record" in why and why.endswith("--force removes it")
    assert judge(old, force=True)[0] == "remove"
