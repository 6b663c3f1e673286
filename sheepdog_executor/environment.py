"""``environment="sync"``: the nodes run a Python environment with the client's distributions.

What is synced is ``distributions.py``'s business. Here: the environment is a venv made from the
nodes' interpreter under ``SESSION_ROOT/envs/KEY``; the head node builds it once
(``remote/envtool.py`` keeps builds atomic) and every later executor with the same KEY reuses it
after one SSH command.

The head node installs from its package index when it can; when it cannot (no route to an index, a
distribution it does not know), wheels for the nodes' platform and Python are downloaded here
(``pip download --only-binary=:all: --platform ...``) and uploaded over the SSH connection.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sheepdog_executor.distributions import EnvironmentSpec, NodePython, Wanted, canonical, installed_wheel
from sheepdog_executor.errors import ConfigurationError, DiskFull, EnvironmentSyncFailed, SchedulerError
from sheepdog_executor.jobscript import JobOptions, check_no_control_characters, with_setup
from sheepdog_executor.shell import Shell

log = logging.getLogger("sheepdog_executor")

ENVIRONMENT_MODES = ("sync",)
#: The file in a session directory naming the environment its workers run (its KEY), so that
#: ``cleanup --envs`` keeps an environment a live session uses.
ENVIRONMENT_RECORD = "environment"
#: Seconds a build on the head node may take (pip installing large distributions from source).
BUILD_TIMEOUT = 3600.0
#: Seconds one command waiting for a build's end waits before it is asked again.
BUILD_WAIT = 30.0
#: Exit status of a wait for a build that has not ended yet.
_BUILDING = 75
_ENVTOOL = Path(__file__).with_name("remote") / "envtool.py"
_UNSATISFIED = re.compile(
    r"(?:No matching distribution found for|satisfies the requirement)\s+([A-Za-z0-9][A-Za-z0-9._-]*)"
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SyncedEnvironment:
    """An environment the nodes run: where it is and whether this executor built it."""

    key: str
    path: str
    built: bool
    #: How it was built: "index" (by the head node), "wheels" (uploaded from here); None if reused.
    mode: str | None = None

    @property
    def python(self) -> str:
        return f"{self.path}/bin/python"


class HeadNode:
    """Runs ``envtool.py`` on the head node with the nodes' interpreter (``python=``), after the
    ``command_setup`` lines and the ``setup`` lines (run as a task runs them)."""

    def __init__(self, shell: Shell, options: JobOptions, command_setup: Sequence[str] = ()) -> None:
        self.shell = shell
        self.options = options
        self.command_setup = list(command_setup)

    @property
    def python(self) -> str:
        return self.options.python

    def _script(self, *argv: str) -> str:
        """The shell script that runs ``argv`` after the set-up lines."""
        command = " ".join(shlex.quote(a) for a in argv)
        return "\n".join([*self.command_setup, with_setup(self.options, command)])

    def tool(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run an envtool command; its JSON answer (DiskFull when it met a full disk or quota)."""
        done = self.shell.run(
            self._script(self.python, "-", *args), stdin=_ENVTOOL.read_bytes(), timeout=timeout
        )
        return self._answer(done.returncode, done.stdout, done.stderr)

    def build(self, envs: str, key: str, staging: str, timeout: float) -> dict[str, Any]:
        """Run ``envtool build`` for the spec in ``staging`` detached from the SSH connection
        (``nohup setsid``), so a build survives a dropped connection, and wait for its answer in
        commands of at most ``BUILD_WAIT`` seconds each: after a drop the next one reconnects."""
        tool = f"{staging}/envtool.py"
        self.shell.put(tool, _ENVTOOL.read_bytes(), 0o600)
        build = f"{staging}/build-{secrets.token_hex(4)}"  # a staging directory sees one or two builds
        out, err, status = (shlex.quote(f"{build}.{name}") for name in ("out", "err", "status"))
        script = self._script(self.python, tool, "build", envs, key, f"{staging}/spec.json")
        # in the user's login shell, as a command over SSH runs; the exit status is written last
        run = (
            f'"${{SHELL:-/bin/sh}}" -c {shlex.quote(script)} >{out} 2>{err} </dev/null; '
            f"echo $? >{status}.new; mv {status}.new {status}"
        )
        started = shlex.quote(f"{build}.started")
        # started once, even if this command runs twice (its answer lost with a connection)
        self.shell.run(
            f"mkdir {started} 2>/dev/null || exit 0; nohup setsid sh -c {shlex.quote(run)} "
            ">/dev/null 2>&1 </dev/null &",
            timeout=60,
        )
        wait = (
            f"i=0; while [ ! -e {status} ] && [ $i -lt {int(BUILD_WAIT * 5)} ]; do\n"
            "sleep 0.2; i=$((i+1)); done\n"
            f"[ -e {status} ] || exit {_BUILDING}\n"
            f"cat {status}; printf '\\036\\n'; cat {out}; printf '\\036\\n'; cat {err}"
        )
        deadline = time.monotonic() + timeout
        while True:
            done = self.shell.run(wait, timeout=BUILD_WAIT + 60)
            parts = done.stdout.split("\036\n")
            if done.returncode == 0 and len(parts) == 3 and parts[0].strip().lstrip("-").isdigit():
                return self._answer(int(parts[0]), parts[1], parts[2])
            # still building, or the connection dropped under the wait (no exit status): wait again
            if done.returncode not in (_BUILDING, -1):
                return self._answer(done.returncode, done.stdout, done.stderr)
            if time.monotonic() > deadline:
                raise EnvironmentSyncFailed(
                    f"the environment build on {self.shell.description} did not end within "
                    f"{timeout:.0f} s; leave out what takes that long to build with "
                    "environment_exclude= and provide it with setup="
                )
            if done.returncode == -1:
                log.warning(
                    "lost the answer of a wait for the build on %s; waiting again", self.shell.description
                )

    def _answer(self, returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
        """The JSON answer an envtool command printed last, or SchedulerError saying why none."""
        lines = stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if returncode == 0 and lines else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            why = (stderr.strip() or stdout.strip() or f"exit {returncode}")[-2000:]
            raise SchedulerError(
                f"the environment tool failed on {self.shell.description} with {self.python!r}: {why}"
            )
        if answer.get("status") == "no-space":
            free = answer.get("free")
            raise DiskFull(str(answer.get("path")), free if isinstance(free, int) else None)
        return answer


def check_requirements(add: Sequence[str]) -> None:
    """Raise ConfigurationError unless each ``environment_add`` entry is one requirement: pip must
    never read one as an option (``-r FILE``, ``--index-url=...``) here or on the head node."""
    check_no_control_characters("environment_add", add)
    for entry in add:
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigurationError(
                f"environment_add entry {entry!r} is not a requirement: give strings such as "
                "'requests==2.31.0' or 'mypkg @ https://host/mypkg-1.0.tar.gz'"
            )
        if entry.lstrip().startswith("-"):
            raise ConfigurationError(
                f"environment_add entry {entry!r} is a pip option, not a requirement: "
                "environment_add= takes requirements only (e.g. 'requests==2.31.0'). List the "
                "requirements of a file one by one, and choose a package index with PIP_INDEX_URL "
                "(or pip.conf) on the client and with a setup= line on the head node"
            )


class EnvironmentSync:
    """Makes the nodes' environment match the client's: probe, build (once), reuse."""

    def __init__(self, spec: EnvironmentSpec, progress: Progress | None = None) -> None:
        self.spec = spec
        self.progress = progress or (lambda message: None)

    @classmethod
    def from_options(
        cls,
        environment: str | None,
        add: Sequence[str] | str = (),
        exclude: Sequence[str] | str = (),
        progress: Progress | None = None,
    ) -> EnvironmentSync | None:
        """The sync an executor's options ask for, or None (the nodes' own interpreter)."""
        if environment is None or environment == "none":
            if add or exclude:
                raise ConfigurationError('environment_add= and environment_exclude= need environment="sync"')
            return None
        if environment not in ENVIRONMENT_MODES:
            raise ConfigurationError(
                f'environment={environment!r} is not known; use environment="sync" (the nodes get the '
                "client's packages) or leave it out (the nodes' own interpreter)"
            )
        add = [add] if isinstance(add, str) else list(add)
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        check_requirements(add)
        return cls(EnvironmentSpec.from_client(add, exclude), progress)

    def _say(self, message: str) -> None:
        log.info("environment: %s", message)
        self.progress(message)

    def prepare(self, head: HeadNode, root: str) -> SyncedEnvironment:
        """The environment for this spec under ``ROOT/envs``, built first if it is not there yet."""
        envs = f"{root}/envs"
        node = NodePython.from_probe(head.tool("probe", envs, timeout=60))
        client = "{}.{}".format(*sys.version_info[:2])
        if node.python.rsplit(".", 1)[0] != client:  # pickles would not travel; the pins would not fit
            raise EnvironmentSyncFailed(
                f'environment="sync" needs Python {client} on the nodes, as on this client; '
                f"{head.python!r} there is Python {node.python} ({node.executable}): set python= "
                f"(or a setup= line such as 'module load python/{client}') to a Python {client}"
            )
        key = self.spec.key(node)
        path = f"{envs}/{key}"
        if key in node.ready:
            log.info("environment %s is ready (python %s)", path, node.python)
            return SyncedEnvironment(key, path, built=False)
        started = time.monotonic()
        self._say(
            f"building {path} on {head.shell.description}: {len(self.spec.distributions)} "
            f"distributions for Python {node.python} ({node.executable})"
        )
        staging = f"{envs}/.staging-{secrets.token_hex(4)}"
        try:
            with tempfile.TemporaryDirectory(prefix="sheepdog-env-") as here:
                wheels = self._local_wheels(node, here)
                uploaded: set[str] = set()
                answer = self._build(head, envs, key, staging, "index", self.spec.indexed, wheels, uploaded)
                if answer["status"] != "ready":
                    why = _last_line(answer.get("output", ""))
                    self._say(
                        f"the head node could not install from a package index ({why}); downloading here"
                    )
                    wheels += self._download(node, here, why)
                    answer = self._build(head, envs, key, staging, "wheels", [], wheels, uploaded)
                    if answer["status"] != "ready":
                        raise self._install_failed(answer)
        finally:
            try:
                head.shell.run(f"rm -rf {shlex.quote(staging)}", timeout=60)
            except Exception as exc:  # noqa: BLE001 - must not hide the build's own error
                log.warning("could not remove %s: %s", staging, exc)
        mode = answer.get("mode") if answer.get("built") else None
        if answer.get("built"):
            self._say(f"{path} built in {time.monotonic() - started:.0f} s")
        else:
            self._say(f"{path} was built meanwhile by another client; using it")
        return SyncedEnvironment(key, path, built=bool(answer.get("built")), mode=mode)

    def _build(
        self,
        head: HeadNode,
        envs: str,
        key: str,
        staging: str,
        mode: str,
        requirements: list[str],
        wheels: list[str],
        uploaded: set[str],
    ) -> dict[str, Any]:
        """Upload the wheels (those not uploaded yet) and the spec; run the build on the head node."""
        wheel_dir = f"{staging}/wheels"
        todo = [w for w in wheels if w not in uploaded]
        if todo:
            size = sum(os.path.getsize(w) for w in todo)
            self._say(f"uploading {len(todo)} wheel(s), {size / 1e6:.1f} MB")
            for wheel in todo:
                head.shell.put(f"{wheel_dir}/{os.path.basename(wheel)}", Path(wheel).read_bytes(), 0o600)
            uploaded.update(todo)
        spec = {
            "mode": mode,
            "requirements": requirements,
            "wheel_dir": wheel_dir,
            "wheels": [os.path.basename(w) for w in wheels],
            "summary": {
                "distributions": [d.requirement for d in self.spec.distributions],
                "add": list(self.spec.add),
                "client": os.uname().nodename,
            },
        }
        head.shell.put(f"{staging}/spec.json", json.dumps(spec).encode(), 0o600)
        where = "from the package index" if mode == "index" else "from the uploaded wheels"
        self._say(f"installing {len(requirements) + len(wheels)} distribution(s) on the head node {where}")
        answer = head.build(envs, key, staging, timeout=BUILD_TIMEOUT)
        if answer.get("status") == "venv-failed":
            raise EnvironmentSyncFailed(
                f"could not create a venv with {head.python} on {head.shell.description}: "
                f"{_last_line(answer.get('output', ''))}; install the venv module there (Debian: "
                "python3-venv) or set python= to an interpreter that has it"
            )
        if answer.get("built"):
            answer["mode"] = mode
        return answer

    def _local_wheels(self, node: NodePython, here: str) -> list[str]:
        """Wheels of the distributions installed from a path, editable or from version control (made
        of the installed files when they can be, else built from the repository at its commit)."""
        wheels = []
        for wanted in self.spec.local:
            assert wanted.source is not None
            made = None
            if wanted.installed:
                made = installed_wheel(wanted.installed, tempfile.mkdtemp(prefix="wheel-", dir=here))
            if made is not None:
                self._say(
                    f"building a wheel of {wanted.name} {wanted.version} from the files installed here "
                    f"({wanted.origin})"
                )
                wheel = made
            elif wanted.source.endswith(".whl") and os.path.isfile(wanted.source):
                wheel = wanted.source
            else:
                self._say(f"building a wheel of {wanted.name} {wanted.version} from {wanted.source}")
                wheel = _pip_wheel(wanted, wanted.source, here)
            if not node.accepts(wheel):
                raise _cannot_provide(
                    wanted,
                    f"its wheel {os.path.basename(wheel)}, built here, does not fit the nodes "
                    f"({node.python_tag}, {node.platforms()[0]})",
                )
            wheels.append(wheel)
        return wheels

    def _download(self, node: NodePython, here: str, head_failure: str) -> list[str]:
        """Wheels for the nodes' platform and Python of everything an index has; pure-Python wheels
        built here for distributions that publish no wheel."""
        target = os.path.join(here, "download")
        requirements = self.spec.indexed
        built: list[str] = []
        by_name = {canonical(d.name): d for d in self.spec.distributions}
        while requirements:
            self._say(f"downloading {len(requirements)} wheel(s) for {node.python_tag} {node.platforms()[0]}")
            argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
            argv += ["--disable-pip-version-check", "--no-input", "-d", target]
            argv += ["--python-version", node.python, "--implementation", node.python_tag[:2]]
            for platform in node.platforms():
                argv += ["--platform", platform]
            # after "--": pip reads no requirement as an option
            done = subprocess.run([*argv, "--", *requirements], capture_output=True, text=True, check=False)
            if done.returncode == 0:
                break
            output = done.stdout + done.stderr
            match = _UNSATISFIED.search(output)
            name = canonical(re.split(r"[=<>!~ \[;]", match.group(1))[0]) if match else ""
            wanted = by_name.get(name)
            if wanted is None:
                raise EnvironmentSyncFailed(
                    f"could not download wheels for the nodes ({node.python_tag}, {node.platforms()[0]}): "
                    f"{_last_line(output)}; correct environment_add=, or leave out the distribution it "
                    "names with environment_exclude="
                )
            wheel = _try_pure_wheel(wanted, here)
            if wheel is None or not node.accepts(wheel):
                raise _cannot_provide(
                    wanted,
                    f"the package index has no wheel of it for the nodes ({node.python_tag}, "
                    f"{node.platforms()[0]}), the head node could not install it from an index "
                    f"({head_failure}), and it builds no pure-Python wheel here",
                )
            built.append(wheel)
            requirements = [r for r in requirements if r != wanted.requirement]
        downloaded = sorted(str(p) for p in Path(target).glob("*.whl")) if os.path.isdir(target) else []
        return downloaded + built

    def _install_failed(self, answer: dict[str, Any]) -> EnvironmentSyncFailed:
        output = str(answer.get("output", ""))
        by_name = {canonical(d.name): d for d in self.spec.distributions}
        for name in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", output):
            if canonical(name) in by_name:
                return _cannot_provide(
                    by_name[canonical(name)], "pip on the head node: " + _last_line(output)
                )
        return EnvironmentSyncFailed(
            f"installing the synced environment on the head node failed: {_last_line(output)}; exclude "
            "the distribution it names with environment_exclude=, or provide it with setup="
        )


def _pip_wheel(wanted: Wanted, source: str, here: str) -> str:
    """Build a wheel of ``source`` here with pip; its path."""
    out = tempfile.mkdtemp(prefix="wheel-", dir=here)
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "--no-input"]
    done = subprocess.run([*argv, "-w", out, source], capture_output=True, text=True, check=False)
    wheels = list(Path(out).glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise _cannot_provide(
            wanted, f"building its wheel here failed: {_last_line(done.stdout + done.stderr)}"
        )
    return str(wheels[0])


def _try_pure_wheel(wanted: Wanted, here: str) -> str | None:
    """A wheel of an index distribution built here from its source, or None if that fails."""
    try:
        return _pip_wheel(wanted, wanted.requirement, here)
    except EnvironmentSyncFailed:
        return None


def _cannot_provide(wanted: Wanted, cause: str) -> EnvironmentSyncFailed:
    return EnvironmentSyncFailed(
        f'environment="sync" cannot provide {wanted.name} {wanted.version} to the nodes: {cause}. '
        f"Fix: leave it out with environment_exclude=[{wanted.name!r}] (if the nodes' code does not "
        "need it), or install it on the nodes yourself and make it importable with setup= "
        "(e.g. setup=['module load ...'] or an export of PYTHONPATH)",
        distribution=wanted.name,
        version=wanted.version,
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1]


def stderr_progress(progress: bool | None) -> Progress | None:
    """Progress lines on stderr, as the executor's ``progress`` option says (None: on a terminal)."""
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    return lambda message: print(f"sheepdog-executor: {message}", file=sys.stderr, flush=True)
