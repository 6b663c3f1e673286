"""A head node's answers, recorded once on a real cell and played back without one.

``RecordingShell`` passes every command to a real shell and keeps what it answered; ``ReplayShell``
answers the same commands with those answers, in the order they came, each different answer once
(a wait for a state then lasts no longer than it takes to read the states before it), and the last
one again once they run out: a scheduler module is checked against its real scheduler's output in
the unit tier. A command that was never recorded fails the test, naming it: the scheduler changed what it
runs, and the recording is made again on the cells (``SHEEPDOG_RECORD_SCHEDULERS=1``, see
``tests/test_scheduler_contract.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sheepdog_executor.shell import Completed, Shell

#: One JSON file per scheduler: {test name: {"session": ..., "answers": {command: [answer, ...]}}}.
RECORDED = Path(__file__).resolve().parent / "recorded"


class RecordingShell:
    """``shell``, keeping each command's answer (consecutive equal answers as one, with a count)."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.description = shell.description
        self.answers: dict[str, list[dict[str, Any]]] = {}

    def run(
        self, command: str, *, stdin: bytes = b"", timeout: float = 120.0, retry: bool = True
    ) -> Completed:
        done = self.shell.run(command, stdin=stdin, timeout=timeout, retry=retry)
        answer = {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr, "times": 1}
        seen = self.answers.setdefault(command, [])
        if seen and all(seen[-1][k] == answer[k] for k in ("returncode", "stdout", "stderr")):
            seen[-1]["times"] += 1
        else:
            seen.append(answer)
        return done

    def put(self, path: str, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
        self.shell.put(path, data, mode, replace=replace)

    def close(self) -> None:
        self.shell.close()

    def save(self, scheduler: str, test: str, session: str) -> None:
        """Keep this test's answers in the scheduler's recording file."""
        path = RECORDED / f"{scheduler}.json"
        recorded = json.loads(path.read_text()) if path.exists() else {}
        recorded[test] = {"session": session, "answers": self.answers}
        path.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


class ReplayShell:
    """Answers each command as the recorded head node did; writes nothing anywhere."""

    def __init__(self, scheduler: str, test: str) -> None:
        path = RECORDED / f"{scheduler}.json"
        if not path.exists():
            raise AssertionError(f"no recording of {scheduler}'s answers ({path}): {RECORD_AGAIN}")
        recorded = json.loads(path.read_text())
        if test not in recorded:
            raise AssertionError(f"{path} has no answers for {test}: {RECORD_AGAIN}")
        self.session: str = recorded[test]["session"]
        self.answers: dict[str, list[dict[str, Any]]] = recorded[test]["answers"]
        self.description = f"recorded {scheduler} head node"
        self.commands: list[str] = []

    def run(
        self, command: str, *, stdin: bytes = b"", timeout: float = 120.0, retry: bool = True
    ) -> Completed:
        self.commands.append(command)
        answers = self.answers.get(command)
        if not answers:
            raise AssertionError(f"no recorded answer for this command: {RECORD_AGAIN}\n{command}")
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        return Completed(command, answer["returncode"], answer["stdout"], answer["stderr"])

    def put(self, path: str, data: bytes, mode: int = 0o600, *, replace: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


RECORD_AGAIN = (
    "record again on the cells: SHEEPDOG_RECORD_SCHEDULERS=1 python3 -m pytest "
    "tests/test_scheduler_contract.py -m cluster"
)
