"""environment="sync": the nodes get the client's packages.

Unit tests of what is synced and how wheels are chosen, then the real thing on the cell (whose nodes
have neither dask, numpy nor the test's own package): a client venv made here, an environment built
on the cell from the index, again through the upload path with the head node's index unreachable, the
error for a distribution nobody can provide, two builders at once, and a package installed from a git
repository that is gone (on the multi-host cell, whose head node has its own /tmp).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import read_line, require_up, ssh, ssh_to, wait_until

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.cli import main
from sheepdog_executor.config import CONFIG_ENV
from sheepdog_executor.distributions import EnvironmentSpec, NodePython, Wanted, client_distributions
from sheepdog_executor.environment import EnvironmentSync, HeadNode
from sheepdog_executor.errors import ConfigurationError, EnvironmentSyncFailed
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.shell import LocalShell, SSHShell, SSHTarget

REPO = Path(__file__).resolve().parent.parent
#: Holds an exclusive lock of the file argv[1] until its stdin ends (says "held" once it holds it).
HOLD_LOCK = (
    "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    "print('held', flush=True); sys.stdin.read()"
)
NODE = NodePython("3.11.2", "cpython", "/usr/bin/python3", "linux-x86_64", "x86_64", ("glibc", "2.36"))


# -- unit tests ----------------------------------------------------------------------------------
def test_platforms_of_a_glibc_node_and_the_wheels_it_accepts() -> None:
    platforms = NODE.platforms()
    assert platforms[0] == "manylinux_2_36_x86_64"
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux1_x86_64"} <= set(platforms)
    assert platforms[-1] == "linux_x86_64"
    assert NODE.accepts("numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert NODE.accepts("six-1.17.0-py2.py3-none-any.whl")
    assert NODE.accepts("cryptography-42.0.5-cp39-abi3-manylinux_2_28_x86_64.whl")
    assert not NODE.accepts("numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.whl")
    assert not NODE.accepts("numpy-1.26.4-cp311-cp311-macosx_11_0_arm64.whl")
    assert not NODE.accepts("numpy-1.26.4-cp311-cp311-manylinux_2_39_x86_64.whl")


def _dist(site: Path, name: str, files: list[str], direct_url: dict[str, object] | None = None) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    for file in files:  # importlib_metadata (a backport dask imports) lists only files that exist
        if not file.startswith(".."):
            (site / file).parent.mkdir(parents=True, exist_ok=True)
            (site / file).touch()
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))


def test_what_is_synced_and_the_key(tmp_path: Path) -> None:
    site, project = tmp_path / "site", tmp_path / "project"
    (project / "mine").mkdir(parents=True)
    (project / "mine" / "__init__.py").write_text("X = 1\n")
    _dist(site, "plain", ["plain/__init__.py"])
    _dist(site, "no-modules", ["../../bin/tool"])
    _dist(site, "pip", ["pip/__init__.py"])  # never synced: the environment has its own
    _dist(
        site,
        "mine",
        ["__editable__.mine-1.0.pth"],
        {"url": f"file://{project}", "dir_info": {"editable": True}},
    )
    wanted = {w.name: w for w in client_distributions([str(site)])}
    assert set(wanted) == {"plain", "mine", "pip"}
    assert wanted["plain"].source is None and wanted["mine"].source == str(project)
    spec = EnvironmentSpec.from_client(exclude=["Plain"], path=[str(site)])
    assert [w.name for w in spec.distributions] == ["mine"]  # not pip, not the excluded one
    key = spec.key(NODE)
    assert EnvironmentSpec.from_client(exclude=["plain"], path=[str(site)]).key(NODE) == key
    os.utime(project / "mine" / "__init__.py", ns=(1, 1))  # the project changed: a new environment
    assert EnvironmentSpec.from_client(exclude=["plain"], path=[str(site)]).key(NODE) != key


def test_options() -> None:
    sync = EnvironmentSync.from_options("sync", add=["six==1.17.0"], exclude=["pytest"])
    assert sync is not None and "six==1.17.0" in sync.spec.indexed
    assert "pytest" not in {w.name for w in sync.spec.distributions}
    assert sync.spec.key(NODE) != EnvironmentSpec(sync.spec.distributions).key(NODE)
    assert EnvironmentSync.from_options(None) is None
    with pytest.raises(ConfigurationError, match='environment="sync"'):
        EnvironmentSync.from_options("conda")
    with pytest.raises(ConfigurationError, match='need environment="sync"'):
        EnvironmentSync.from_options(None, exclude=["numpy"])


def test_nodes_of_another_python_minor_version_are_refused_before_any_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = {**dataclasses.asdict(NODE), "python": "3.9.2", "libc": list(NODE.libc), "ready": []}
    calls: list[tuple[str, ...]] = []

    def tool(self: HeadNode, *args: str, timeout: float = 0) -> dict[str, object]:
        calls.append(args)
        return probe

    monkeypatch.setattr(HeadNode, "tool", tool)
    head = HeadNode(LocalShell(), JobOptions())
    with pytest.raises(
        EnvironmentSyncFailed, match=r"needs Python 3\.\d+ on the nodes.*3\.9\.2.*set python="
    ):
        EnvironmentSync(EnvironmentSpec((Wanted("six", "1.17.0"),))).prepare(head, "/nowhere")
    assert [args[0] for args in calls] == ["probe"]


# -- on the cell ---------------------------------------------------------------------------------
PINNED = ["dask", "numpy", "cloudpickle", "tornado", "paramiko", "cryptography"]
PACKAGE = {
    "pyproject.toml": '[build-system]\nrequires = ["setuptools>=61"]\n'
    'build-backend = "setuptools.build_meta"\n[project]\nname = "sdenvpkg"\nversion = "0.1.0"\n',
    "sdenvpkg/__init__.py": '"""The test\'s own package, installed editable in the client venv."""\n\n\n'
    "def triple(x: int) -> int:\n    return 3 * x\n",
}


def git_installed(tmp: Path, python: str = sys.executable, keep: bool = False) -> tuple[Path, str, str]:
    """A package ``sdvcspkg`` committed to a git repository under ``tmp``, installed with ``pip install
    --target SITE git+file://REPO`` (a value of its own in the commit), and the repository removed: only
    the installed files are left (unless ``keep``). SITE, the value and the commit."""
    repo, site, value = tmp / "sdvcspkg-repo", tmp / "site", uuid.uuid4().hex
    (repo / "sdvcspkg").mkdir(parents=True)
    (repo / "pyproject.toml").write_text(
        PACKAGE["pyproject.toml"].replace("sdenvpkg", "sdvcspkg").replace("0.1.0", "0.2.0")
    )
    (repo / "sdvcspkg" / "__init__.py").write_text(f"VALUE = {value!r}\n")
    git = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "sdvcspkg 0.2.0"]):
        subprocess.run([*git, *args], check=True, timeout=30)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "--target", str(site), f"git+file://{repo}"], check=True, timeout=300)
    if not keep:
        subprocess.run(["rm", "-rf", str(repo)], check=True)
    return site, value, commit.strip()


@pytest.mark.slow  # pip builds from a git repository: 5-12 s each
def test_a_distribution_installed_from_git_ships_as_installed(tmp_path: Path) -> None:
    site, value, commit = git_installed(tmp_path)
    (wanted,) = client_distributions([str(site)])
    assert (wanted.name, wanted.version) == ("sdvcspkg", "0.2.0")
    assert commit in wanted.digest  # another commit, another environment
    spec = EnvironmentSpec((wanted,))
    assert spec.indexed == [] and spec.local == [wanted]
    # the repository is gone: the wheel is made of the files installed here
    (wheel,) = EnvironmentSync(spec)._local_wheels(NODE, str(tmp_path))
    assert os.path.basename(wheel) == "sdvcspkg-0.2.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "sdvcspkg/__init__.py" in names and "sdvcspkg-0.2.0.dist-info/RECORD" in names
        assert not [n for n in names if n.endswith(".pyc") or "direct_url" in n or "INSTALLER" in n]
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "--no-index", "--target", str(target), wheel], check=True, timeout=120)
    check = "import sdvcspkg; print(sdvcspkg.VALUE)"
    done = subprocess.run(
        [sys.executable, "-c", check],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == value


@pytest.mark.slow  # pip builds from a git repository: 5-12 s each
def test_a_git_install_whose_files_are_not_all_here_is_built_from_its_commit(tmp_path: Path) -> None:
    site, value, commit = git_installed(tmp_path, keep=True)
    (site / "sdvcspkg" / "__init__.py").unlink()  # its RECORD names a file that is gone
    repo = tmp_path / "sdvcspkg-repo"
    (repo / "sdvcspkg" / "__init__.py").write_text("VALUE = 'a later commit'\n")
    git = ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run([*git, "commit", "-qam", "later"], check=True, timeout=30)
    (wanted,) = client_distributions([str(site)])
    assert wanted.source == f"git+file://{repo}@{commit}"
    (wheel,) = EnvironmentSync(EnvironmentSpec((wanted,)))._local_wheels(NODE, str(tmp_path))
    with zipfile.ZipFile(wheel) as archive:  # pip built it from the repository at the installed commit
        assert archive.read("sdvcspkg/__init__.py").decode() == f"VALUE = {value!r}\n"


@pytest.fixture(scope="session")
def client_venv() -> Path:
    """A venv of this machine's Python with dask, numpy and the editable package ``sdenvpkg``; made
    once per content in ~/.cache/sheepdog-tests and reused by later runs."""
    import importlib.metadata

    pins = [f"{n}=={importlib.metadata.version(n)}" for n in PINNED]
    stamp = hashlib.sha256(json.dumps([sys.version, pins, PACKAGE]).encode()).hexdigest()[:12]
    cache = Path("~/.cache/sheepdog-tests").expanduser()
    venv, project = cache / f"client-venv-{stamp}", cache / f"sdenvpkg-{stamp}"
    if (venv / "ready").exists():
        return venv
    for name, text in PACKAGE.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    tmp = cache / f".client-venv-{stamp}-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True, timeout=120)
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *pins], check=True, timeout=600)
    subprocess.run([*pip, "-e", str(project)], check=True, timeout=300)
    (tmp / "ready").write_text("")
    os.rename(tmp, venv)
    return venv


@pytest.fixture(scope="session")
def env_root(cell: str) -> Iterator[str]:
    """A session root of its own on the cell for this test session, so environments are built anew."""
    home = ssh('printf %s "$HOME"').stdout.strip()
    root = f"{home}/.sheepdog-test-env-{os.getpid()}-{int(time.time())}"
    yield root
    # in the background (its own session, or the end of the ssh session ends it): nothing waits for it
    ssh(f"nohup setsid rm -rf {shlex.quote(root)} >/dev/null 2>&1 </dev/null &")


def _client(venv: Path, cell: str, root: str, scenario: str) -> tuple[dict[str, object], str]:
    """Run env_client.py in the client venv (progress lines on): its JSON answer and its stderr."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(REPO / "tests" / "env_client.py"), cell, root, scenario],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "PYTHONPATH": str(REPO), "ENV_CLIENT_PROGRESS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result, done.stderr


def _check_synced(result: dict[str, object], mode: str) -> None:
    first, second, node = result["first"], result["second"], result["node"]
    assert isinstance(first, dict) and isinstance(second, dict) and isinstance(node, dict)
    assert (first["built"], first["mode"]) == (True, mode)
    assert result["total"] == sum(range(1000))
    assert result["mapped"] == [0, 3, 6, 9, 12] and result["again"] == 21
    # the nodes imported dask and numpy at the client's versions, and the package, from the environment
    assert {k: node[k] for k in ("dask", "numpy")} == result["client"]
    assert node["python"] == first["path"] + "/bin/python"
    assert str(node["sdenvpkg"]).startswith(first["path"] + "/lib/")
    assert (second["built"], second["path"]) == (False, first["path"])
    print(f"\nsync via {mode}: first start {first['start']:.1f} s, reusing start {second['start']:.2f} s")


@pytest.mark.cluster
def test_sync_from_the_index(client_venv: Path, cell: str, env_root: str) -> None:
    result, progress = _client(client_venv, cell, f"{env_root}/online", "run")
    _check_synced(result, "index")
    assert "sheepdog-executor: building a wheel of sdenvpkg 0.1.0" in progress
    assert "on the head node from the package index" in progress


@pytest.mark.cluster
def test_sync_through_the_upload_path(client_venv: Path, cell: str, env_root: str) -> None:
    result, progress = _client(client_venv, cell, f"{env_root}/offline", "offline")
    _check_synced(result, "wheels")
    assert re.search(r"sheepdog-executor: downloading \d+ wheel\(s\) for cp311", progress)
    assert re.search(r"sheepdog-executor: uploading \d+ wheel\(s\), [\d.]+ MB", progress)
    assert "on the head node from the uploaded wheels" in progress


@pytest.mark.cluster
def test_a_distribution_nobody_can_provide(client_venv: Path, cell: str, env_root: str) -> None:
    result, _ = _client(client_venv, cell, f"{env_root}/online", "unprovidable")
    assert result["type"] == "EnvironmentSyncFailed"
    error = str(result["error"])
    assert "cannot provide sheepdog-no-such-dist 1.0" in error
    assert "environment_exclude=['sheepdog-no-such-dist']" in error and "setup=" in error


@pytest.mark.cluster
def test_two_executors_starting_at_once_build_one_environment(
    client_venv: Path, cell: str, env_root: str
) -> None:
    result, progress = _client(client_venv, cell, f"{env_root}/race", "race")
    race = result["race"]
    assert isinstance(race, list) and len(race) == 2
    assert sorted(r["built"] for r in race) == [False, True]
    assert race[0]["path"] == race[1]["path"] and race[0]["toolz"] == race[1]["toolz"]
    # the second found the environment missing, waited for the first's lock, then used its build
    assert "was built meanwhile by another client; using it" in progress
    listing = ssh(f"ls -A {shlex.quote(env_root)}/race/envs").stdout.split()
    assert [n for n in listing if not n.endswith(".lock")] == [race[0]["path"].rsplit("/", 1)[1]]


@pytest.mark.cluster
def test_cleanup_lists_and_removes_environments(
    cell: str,
    env_root: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = f"{env_root}/cleanup"
    shell = SSHShell(SSHTarget.resolve(cell))
    try:
        synced = EnvironmentSync(EnvironmentSpec((Wanted("six", "1.17.0"),))).prepare(
            HeadNode(shell, JobOptions()), root
        )
    finally:
        shell.close()
    (tmp_path / "config.toml").write_text("")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config.toml"))
    monkeypatch.setenv("SHEEPDOG_SESSION_ROOT", root)

    assert main(["cleanup", cell]) == 0
    out = capsys.readouterr().out
    assert f"environment {synced.key}: 1 distributions, built " in out and "--envs removes it" in out
    assert ssh(f"test -x {synced.python}").returncode == 0

    # while a build holds its lock, --envs leaves it alone
    holder = subprocess.Popen(
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            cell,
            f"python3 -c {shlex.quote(HOLD_LOCK)} {shlex.quote(synced.path + '.lock')}",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(holder, 60, "the lock holder's word").strip() == "held"
        assert main(["cleanup", cell, "--envs"]) == 0
        assert f"kept environment {synced.key}: it is being built" in capsys.readouterr().out
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the holder reads EOF, exits, and the lock goes with it
        holder.wait(timeout=30)
    assert ssh(f"test -x {synced.python}").returncode == 0

    assert main(["cleanup", cell, "--envs"]) == 0
    assert f"removed 1 environment(s) under {root}/envs" in capsys.readouterr().out
    assert ssh(f"test -e {synced.path}").returncode == 1


@pytest.mark.cluster
def test_cleanup_envs_keeps_an_environment_a_live_session_uses(
    cell: str,
    env_root: str,
    make_executor: Callable[..., GridEngineExecutor],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = f"{env_root}/in-use"
    only_six = [d.name for d in client_distributions() if d.name != "six"]
    executor = make_executor(
        environment="sync", environment_exclude=only_six, session_root=root, max_workers=1
    )
    synced = executor.environment
    assert synced is not None
    session = executor.session_dir.rsplit("/", 1)[1]
    (tmp_path / "config.toml").write_text("")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "config.toml"))
    monkeypatch.setenv("SHEEPDOG_SESSION_ROOT", root)

    assert main(["cleanup", cell, "--envs"]) == 0
    out = capsys.readouterr().out
    assert f"kept environment {synced.key}: session {session} uses it" in out, out
    assert f"removed 0 environment(s) under {root}/envs" in out
    assert executor.submit(sum, [1, 2]).result(timeout=120) == 3  # its workers still start

    executor.shutdown(wait=True)
    assert main(["cleanup", cell, "--envs"]) == 0
    assert f"removed 1 environment(s) under {root}/envs" in capsys.readouterr().out
    assert ssh(f"test -e {synced.path}").returncode == 1


@pytest.mark.cluster
def test_an_ssh_drop_during_the_build_reconnects_to_it(cell: str, env_root: str) -> None:
    root = f"{env_root}/drop"
    envs = f"{root}/envs"
    spec = EnvironmentSpec((Wanted("six", "1.17.0"),))
    shell = SSHShell(SSHTarget.resolve(cell))
    head = HeadNode(shell, JobOptions())
    key = spec.key(NodePython.from_probe(head.tool("probe", envs)))
    # the build waits for this lock while the connection drops: the drop surely comes mid-build
    holder = subprocess.Popen(
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            cell,
            f"mkdir -p {envs} && python3 -c {shlex.quote(HOLD_LOCK)} {envs}/{key}.lock",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    outcome: dict[str, Any] = {}

    def prepare() -> None:
        try:
            outcome["synced"] = EnvironmentSync(spec).prepare(head, root)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            outcome["error"] = exc

    builder = threading.Thread(target=prepare)
    try:
        lock = shlex.quote(f"{envs}/{key}.lock")
        wait_until(lambda: ssh(f"flock -n {lock} true").returncode == 1, 60, "the lock holder")
        builder.start()
        building = shlex.quote(f"[b]uild {envs} {key}")
        wait_until(lambda: ssh(f"pgrep -u $(id -u) -f {building}").returncode == 0, 60, "the build")
        shell.transport().close()  # the SSH connection drops under the build
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # the lock goes: the build goes on
        holder.wait(timeout=30)
    builder.join(timeout=240)
    shell.close()
    assert not builder.is_alive()
    assert "error" not in outcome, repr(outcome.get("error"))
    synced = outcome["synced"]
    assert synced.built and ssh(f"{synced.python} -c 'import six'").returncode == 0


@pytest.mark.cluster
def test_the_environment_comes_from_the_interpreter_the_setup_lines_give(cell: str, env_root: str) -> None:
    # scripts/test-cell.sh's module "sheepdog-python" puts a Python without pip first on PATH: the
    # environment is made from it (and gets pip from ensurepip), not from the login shell's python3
    options = JobOptions(setup=("module load sheepdog-python",))
    shell = SSHShell(SSHTarget.resolve(cell))
    try:
        synced = EnvironmentSync(EnvironmentSpec((Wanted("six", "1.17.0"),))).prepare(
            HeadNode(shell, options), f"{env_root}/module"
        )
    finally:
        shell.close()
    marker = json.loads(ssh(f"cat {synced.path}/.sheepdog-env.json").stdout)
    assert marker["python"] == "/opt/sheepdog-test-python/bin/python3"
    assert ssh(f"{synced.python} -c 'import six; print(six.__version__)'").stdout.strip() == "1.17.0"


@pytest.mark.cluster
@pytest.mark.multihost
def test_sync_ships_a_distribution_installed_from_git(client_venv: Path, tmp_path: Path) -> None:
    """Installed from a git repository the head node cannot reach (on this machine's /tmp, which is
    not the multi-host cell's, and removed before the executor starts): the nodes import it all the
    same, at the installed commit."""
    alias = require_up(
        "fear-multi",
        "qstat -f",
        lambda out: "all.q@mh-node1" in out,
        "multi-host cell",
        "scripts/test-cell.sh --multi-host",
    )
    site, value, commit = git_installed(tmp_path, str(client_venv / "bin" / "python"))
    home = ssh_to(alias, 'printf %s "$HOME"').stdout.strip()
    root = f"{home}/.sheepdog-test-env-vcs-{os.getpid()}-{int(time.time())}"
    try:
        done = subprocess.run(
            [str(client_venv / "bin" / "python"), str(REPO / "tests" / "env_client.py"), alias, root, "vcs"],
            capture_output=True,
            text=True,
            timeout=280,
            env={**os.environ, "PYTHONPATH": f"{REPO}:{site}", "ENV_CLIENT_PROGRESS": "1"},
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        ssh_to(alias, f"nohup setsid rm -rf {shlex.quote(root)} >/dev/null 2>&1 </dev/null &")
    assert f"building a wheel of sdvcspkg 0.2.0 from the files installed here (git commit {commit[:12]})" in (
        done.stderr
    )
    node, client = result["node"], result["client"]
    assert client["file"].startswith(str(site)) and client["value"] == value
    assert (node["version"], node["value"]) == ("0.2.0", value)
    assert node["file"].startswith(result["path"] + "/lib/") and node["host"].startswith("mh-node")
    assert result["built"] is True


@pytest.mark.parametrize("entry", ["-r requirements.txt", "--index-url=http://example.org/simple", " -e ."])
def test_an_environment_add_entry_that_is_a_pip_option_is_refused(entry: str) -> None:
    with pytest.raises(ConfigurationError, match="is a pip option, not a requirement.*PIP_INDEX_URL"):
        EnvironmentSync.from_options("sync", add=["six==1.17.0", entry])


def test_the_head_nodes_pip_reads_no_requirement_as_an_option(tmp_path: Path) -> None:
    """Should one get through, pip takes it as a (bad) requirement: it reads no file it names."""
    secret = tmp_path / "secret.txt"
    secret.write_text("first-line-of-a-private-file\n")
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {"mode": "wheels", "requirements": ["-r", str(secret)], "wheel_dir": str(tmp_path), "wheels": []}
        )
    )
    tool = REPO / "sheepdog_executor" / "remote" / "envtool.py"
    done = subprocess.run(
        [sys.executable, str(tool), "build", str(tmp_path / "envs"), "k", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["status"] == "install-failed"
    assert "first-line-of-a-private-file" not in answer["output"], answer["output"]
