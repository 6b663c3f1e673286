"""The executor on a cell of several hosts (scripts/cell/multihost.sh, ssh alias ``fear-multi``).

A head node (qmaster, sshd) and two execution hosts, mh-node1 and mh-node2, each with its own
network, host name and /tmp, /home shared. Tests that need the client somewhere the execution hosts
cannot reach put it in a network namespace linked to the head node only (``head_only_client``).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from support import executor_factory, read_line, require_netns, require_up, spawn, ssh_to, wait_until

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.errors import WorkerLost

multihost = pytest.mark.multihost

ALIAS = "fear-multi"
NODES = ("mh-node1", "mh-node2")
HEAD_NETNS = "sdm-mh-head"
CELL_SCRIPT = Path(__file__).parents[1] / "scripts" / "cell" / "multihost.sh"
TEST_USER = os.environ.get("SHEEPDOG_TEST_USER", "sdtest")
KEY = "/root/.ssh/sheepdog_test_ed25519"


def mssh(command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command on the multi-host cell's head node with OpenSSH."""
    return ssh_to(ALIAS, command, timeout)


def jobs_named(name: str) -> list[str]:
    """Ids of the test user's jobs with this name on the multi-host cell."""
    out = mssh(f"qstat -u {TEST_USER}").stdout
    return sorted({line.split()[0] for line in out.splitlines()[2:] if line.split()[2:3] == [name[:10]]})


def where(x: int, seconds: float = 0.0) -> tuple[int, str]:
    import socket

    time.sleep(seconds)
    return x, socket.gethostname()


@pytest.fixture(scope="module")
def multi_cell() -> str:
    """The ssh alias of the multi-host cell; skip (or fail in CI) when it is not up."""
    alias = require_up(
        ALIAS,
        "qstat -f",
        lambda out: all(f"all.q@{node}" in out for node in NODES),
        "multi-host cell",
        "scripts/test-cell.sh --multi-host",
    )
    if not _usable():  # a host killed by an earlier run left its queue in an error state
        _revive_cell()
    return alias


@pytest.fixture
def make_multi(multi_cell: str) -> Iterator[Callable[..., GridEngineExecutor]]:
    name = f"mh-{uuid.uuid4().hex[:6]}"
    yield from executor_factory(GridEngineExecutor, multi_cell, job_name=name)
    wait_until(lambda: not jobs_named(name), 60, "the tests' jobs gone from qstat")


@multihost
def test_map_and_submit_spread_over_both_hosts(make_multi: Callable[..., GridEngineExecutor]) -> None:
    executor = make_multi(max_workers=12)  # more than one host's 8 slots
    results = list(executor.map(where, range(48), [0.5] * 48, timeout=180))
    assert [x for x, _ in results] == list(range(48))
    assert set(collections.Counter(host for _, host in results)) == set(NODES)
    hosts = {w["host"] for w in executor.status()["workers"]}
    assert hosts == set(NODES), executor.status()["workers"]
    # submit, as_completed, an exception from a call, a cancelled future
    futures = [executor.submit(where, i) for i in range(6)]
    failing = executor.submit(divmod, 1, 0)
    assert sorted(f.result()[0] for f in as_completed(futures, timeout=120)) == list(range(6))
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=120)


def _kill_node(node: str) -> None:
    """The node dies: every process on it (its execd, the tasks' shepherds and workers) is killed,
    except the namespace holder that is the host itself."""
    holder = Path(f"/var/lib/sheepdog-test-cell/multi/{node}.holder").read_text().strip()
    pids = subprocess.run(["ip", "netns", "pids", f"sdm-{node}"], capture_output=True, text=True).stdout
    for pid in pids.split():
        if pid != holder:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _queues() -> dict[str, tuple[int, str]]:
    """Each execution host's queue: its free slots and its states ("" when usable; "E" an error)."""
    queues = dict.fromkeys(NODES, (0, "gone"))
    for line in mssh("qstat -f").stdout.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0].startswith("all.q@") and fields[0][6:] in queues:
            _, used, total = (int(n) for n in fields[2].split("/"))
            queues[fields[0][6:]] = (total - used, " ".join(fields[5:]))
    return queues


def _usable() -> bool:
    return not any(states for _, states in _queues().values())


def _revive_cell() -> None:
    """Bring a killed node's execd back and wait until both queues take jobs again. The execd reports
    the tasks that died with it only once it is back, and Grid Engine may then put its queue in an
    error state (E, "job N's failure at host"): the cell script clears that, as an admin would."""
    settled_since = None
    deadline = time.monotonic() + 120
    while True:
        subprocess.run(["bash", str(CELL_SCRIPT)], check=True, capture_output=True, timeout=120)
        settled_since = (settled_since or time.monotonic()) if _usable() else None
        if settled_since is not None and time.monotonic() - settled_since > 10:
            return
        assert time.monotonic() < deadline, mssh("qstat -f -explain E").stdout
        time.sleep(2)


@multihost
@pytest.mark.parametrize("retries", [1, 0])
def test_a_node_dies_mid_map(make_multi: Callable[..., GridEngineExecutor], retries: int) -> None:
    executor = make_multi(retries=retries, heartbeat_timeout=10, max_workers=12)
    futures = [executor.submit(where, i, 10.0) for i in range(12)]
    status = executor.status
    wait_until(
        lambda: {w["host"] for w in status()["workers"] if w["holding"]} == set(NODES), 120, "both nodes busy"
    )
    try:
        _kill_node("mh-node2")
        if retries:
            assert sorted(f.result(timeout=240)[0] for f in futures) == list(range(12))
            assert {f.result()[1] for f in futures} == {"mh-node1"}
        else:
            errors = [f.exception(timeout=240) for f in futures]
            lost = [e for e in errors if e is not None]
            assert lost and all(isinstance(e, WorkerLost) for e in lost), errors
            assert all("mh-node2" in str(e) for e in lost), [str(e) for e in lost]
    finally:
        _revive_cell()  # the execd back: it reports its dead jobs gone, and qstat forgets them


@multihost
def test_ctrl_c_leaves_nothing_in_qstat(multi_cell: str) -> None:
    child = spawn(
        [sys.executable, str(Path(__file__).with_name("child_map.py")), "ctrl-c", multi_cell],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        jobs = json.loads(read_line(child, 180, "the child's job ids"))["jobs"]
        assert jobs
        child.send_signal(signal.SIGINT)
        child.wait(timeout=90)
        running = lambda: set(jobs) & set(mssh(f"qstat -u {TEST_USER}").stdout.split())  # noqa: E731
        wait_until(lambda: not running(), 30, "the child's jobs gone from qstat")
    finally:
        child.kill()
        child.wait()


# -- a client only the head node can reach ---------------------------------------------------------


@dataclass
class HeadOnlyClient:
    """A network namespace linked to the head node only: the execution hosts have no route to it."""

    netns: str
    link: str  # its end of the link, inside the namespace
    address: str
    home: Path
    alias: str

    def start(self, script: str, *args: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        env = {**os.environ, "HOME": str(self.home), "PYTHONPATH": os.pathsep.join(sys.path)}
        return subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def head_only_client(multi_cell: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeadOnlyClient]:
    require_netns()
    tag = uuid.uuid4().hex[:6]
    netns, outer, inner = f"mhc-{tag}", f"mho{tag}", f"mhi{tag}"
    subnet = f"10.98.{int(tag[:2], 16)}"
    head_address, client_address = f"{subnet}.1", f"{subnet}.2"
    home = tmp_path_factory.mktemp(f"client-{tag}")
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", netns)
        _ip("link", "set", outer, "netns", HEAD_NETNS)
        _ip("-n", HEAD_NETNS, "addr", "add", f"{head_address}/30", "dev", outer)
        _ip("-n", HEAD_NETNS, "link", "set", outer, "up")
        _ip("-n", netns, "addr", "add", f"{client_address}/30", "dev", inner)
        _ip("-n", netns, "link", "set", inner, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "config").write_text(
            f"Host head\n    HostName {head_address}\n    User {TEST_USER}\n    IdentityFile {KEY}\n"
        )
        keys = [Path(k).read_text().split()[:2] for k in sorted(Path("/etc/ssh").glob("ssh_host_*_key.pub"))]
        (home / ".ssh" / "known_hosts").write_text("".join(f"{head_address} {k} {v}\n" for k, v in keys))
        # the premise: the execution hosts cannot reach the client; the head node can
        for node, expected in ((NODES[0], False), ("mh-head", True)):
            holder = Path(f"/var/lib/sheepdog-test-cell/multi/{node}.holder").read_text().strip()
            probe = subprocess.run(
                ["nsenter", "-t", holder, "-n", "python3", "-c", PROBE, client_address],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert ("unreachable" not in probe.stdout) == expected, (node, probe.stdout)
        yield HeadOnlyClient(netns, inner, client_address, home, "head")
    finally:
        subprocess.run(["ip", "-n", HEAD_NETNS, "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


PROBE = textwrap.dedent(
    """
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], 9), timeout=3)
    except ConnectionRefusedError:
        print("reachable")  # something answered: the address is routed
    except OSError as exc:
        print("unreachable", exc)
    """
)

AUTO_CLIENT = textwrap.dedent(
    """
    import json, sys
    from sheepdog_executor import GridEngineExecutor
    report = {}
    with GridEngineExecutor(host=sys.argv[1], callback="auto", max_workers=4, poll_interval=0.5,
                            job_name=sys.argv[2]) as executor:
        report["result"] = list(executor.map(abs, range(-20, 0), timeout=180))
        report["routes"] = executor.status()["routes"]
        report["worker_routes"] = sorted({w["route"] for w in executor.status()["workers"]})
    print(json.dumps(report))
    """
)


@multihost
def test_auto_when_only_the_head_node_reaches_the_client(head_only_client: HeadOnlyClient) -> None:
    name = f"mha-{uuid.uuid4().hex[:6]}"
    client = head_only_client.start(AUTO_CLIENT, head_only_client.alias, name)
    try:
        out, err = client.communicate(timeout=240)
    finally:
        client.kill()
    assert client.returncode == 0, err[-3000:]
    report = json.loads(out.splitlines()[-1])
    assert report["result"] == list(range(20, 0, -1))
    # offered: the direct address (the head node reached it) first, then the tunnel
    assert [r.split()[0] for r in report["routes"]] == ["direct", "tunnel"], report
    assert report["worker_routes"] == ["tunnel"], report
    assert not jobs_named(name)


@multihost
def test_the_cell_is_really_several_hosts(multi_cell: str) -> None:
    """Premise of this module: distinct host names and /tmp on the hosts, one /home."""
    marker = f"/tmp/mh-premise-{uuid.uuid4().hex[:6]}"
    assert mssh(f"hostname; touch {marker}; echo $HOME").stdout.split()[0] == "mh-head"
    assert not Path(marker).exists()  # the head node's /tmp is not this machine's
    assert socket.gethostbyname("mh-node1") != socket.gethostbyname("mh-node2")


# -- a laptop that drops off the network or sleeps --------------------------------------------------

LAPTOP_CLIENT = textwrap.dedent(
    """
    import json, logging, sys, threading, time, traceback
    from sheepdog_executor import GridEngineExecutor
    from sheepdog_executor.testing import internals
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(threadName)s %(levelname)s %(message)s")
    logging.getLogger("sheepdog_executor").setLevel(logging.INFO)

    def call(i, path):
        import time
        with open(path, "a") as handle:  # the side effect the test counts on the cell
            handle.write(f"{i}\\n")
        time.sleep(0.5)
        return i

    host, name, path, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    report = {}
    with GridEngineExecutor(host=host, max_workers=8, job_name=name, progress=False) as executor:
        def started():
            while sum(w["calls_done"] for w in executor.status()["workers"]) < 40:
                time.sleep(0.5)
            print("started", flush=True)
        threading.Thread(target=started, daemon=True).start()
        connection = internals(executor).shell.transport()
        results = executor.map(call, range(calls), [path] * calls, timeout=1200)
        gathered = []
        try:
            gathered.extend(results)
            report["ok"] = gathered == list(range(calls))
        except Exception:
            report["error"] = traceback.format_exc()
            report["gathered"] = len(gathered)
            report["workers"] = executor.status()["workers"]
        report["jobs"] = executor.job_ids
        report["ssh_remade"] = internals(executor).shell.transport() is not connection
    print(json.dumps(report), flush=True)
    """
)

OUTAGE_SECONDS = 120
LAPTOP_CALLS = 2000


@dataclass
class LaptopRun:
    name: str
    report: dict[str, Any]
    stderr: str
    side_effects: list[str]


@pytest.fixture(scope="module")
def laptop_runs(
    head_only_client: HeadOnlyClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LaptopRun]]:
    """Two maps of 2,000 calls of 0.5 s at once: one client's network goes down for 120 s, the
    other client is suspended (SIGSTOP) for 120 s; each report, stderr and side effects on the cell."""
    # both maps need all 16 slots: an earlier test's dead node must be back, its queue usable (seen:
    # mh-node2's execd gone, its queue "u", minutes after a test had revived it)
    if not _usable():
        _revive_cell()
    wait_until(lambda: _usable() and min(free for free, _ in _queues().values()) >= 8, 180, "16 free slots")
    home = mssh("printf %s $HOME").stdout
    tag = uuid.uuid4().hex[:6]
    paths = {kind: f"{home}/.cache/sheepdog-tests/laptop-{kind}-{tag}.txt" for kind in ("offline", "sleep")}
    mssh("mkdir -p ~/.cache/sheepdog-tests")
    names = {kind: f"mhl{kind[0]}-{tag}" for kind in paths}
    args = {kind: [names[kind], path, str(LAPTOP_CALLS)] for kind, path in paths.items()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # the clients' logs stay after the run, for a failure's post-mortem
    logs = {kind: tmp_path_factory.mktemp("laptop") / f"{kind}-{tag}.log" for kind in paths}
    log_files = {kind: path.open("w") for kind, path in logs.items()}
    clients = {
        # offline: in the namespace linked to the head node only; asleep: on this machine
        "offline": head_only_client.start(
            LAPTOP_CLIENT, head_only_client.alias, *args["offline"], stderr=log_files["offline"]
        ),
        "sleep": subprocess.Popen(
            [sys.executable, "-c", LAPTOP_CLIENT, ALIAS, *args["sleep"]],
            stdout=subprocess.PIPE,
            stderr=log_files["sleep"],
            text=True,
            env=env,
        ),
    }
    stdout = {kind: Lines(client.stdout) for kind, client in clients.items() if client.stdout}
    link = ["ip", "-n", head_only_client.netns, "link", "set", head_only_client.link]
    try:
        # each outage starts as soon as its map runs, and lasts OUTAGE_SECONDS
        ends = {}
        for kind, client in clients.items():
            started = stdout[kind].next(timeout=300)
            assert started == "started", (
                f"{kind}: the map did not start within 300 s ({started!r}); {mssh('qstat -f').stdout}\n"
                f"{logs[kind]}:\n{logs[kind].read_text()[-3000:]}"
            )
            if kind == "offline":
                subprocess.run([*link, "down"], check=True)
            else:
                client.send_signal(signal.SIGSTOP)
            ends[kind] = time.monotonic() + OUTAGE_SECONDS
        for kind in sorted(ends, key=ends.__getitem__):
            time.sleep(max(0.0, ends[kind] - time.monotonic()))  # the outage itself: nothing to poll
            if kind == "offline":
                subprocess.run([*link, "up"], check=True)
            else:
                clients[kind].send_signal(signal.SIGCONT)
        runs = {}
        for kind, client in clients.items():
            client.wait(timeout=900)
            err = f"{logs[kind]}:\n" + logs[kind].read_text()
            lines = [line for line in stdout[kind].rest() if line.startswith("{")]
            assert lines, f"{kind}: no report (exit {client.returncode}):\n{err[-3000:]}"
            effects = mssh(f"cat {paths[kind]}").stdout.split()
            runs[kind] = LaptopRun(names[kind], json.loads(lines[-1]), err, effects)
        yield runs
    finally:
        subprocess.run([*link, "up"], check=False)
        for client in clients.values():
            client.send_signal(signal.SIGCONT)
            client.kill()
            client.wait()
        for handle in log_files.values():
            handle.close()
        mssh("rm -f " + " ".join(paths.values()))
        left = [job for name in names.values() for job in jobs_named(name)]
        if left:  # a client killed here leaves its workers waiting for it (disconnect_tolerance)
            mssh("qdel " + " ".join(left))


class Lines:
    """A child's stdout, line by line, read by a thread of its own: a wait for a line can time out,
    and no line is lost between a wait and the last read (``communicate`` after ``readline`` loses
    what ``readline`` buffered)."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None at the end or when none came within ``timeout``."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def rest(self) -> list[str]:
        """Every line still to come, up to the end (call once the child has exited)."""
        lines = []
        while (line := self._lines.get(timeout=30)) is not None:
            lines.append(line)
        return lines


def _loses_nothing(run: LaptopRun) -> None:
    assert run.report.get("ok") is True, _why_not(run)
    counts = collections.Counter(run.side_effects)
    assert sorted(counts) == sorted(str(i) for i in range(LAPTOP_CALLS)), "a call never ran"
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1][:20]  # none ran twice
    assert not jobs_named(run.name)


def _why_not(run: LaptopRun) -> str:
    """A failed laptop run, the cause first (a CI log may keep only the start of a failure): the
    error's last line, the client's warnings, then its report and the end of its log."""
    error = run.report.get("error", "").strip().splitlines()
    warnings = [line for line in run.stderr.splitlines() if " WARNING " in line or " ERROR " in line]
    return "\n".join(
        [
            f"the map failed: {error[-1] if error else 'no error, wrong results'}",
            "client warnings:",
            *warnings[:30],
            f"report: {run.report}",
            f"log end: {run.stderr[-3000:]}",
        ]
    )


@multihost
@pytest.mark.timeout(900)  # the shared two-minute outages and 2,000 calls run in the first one's set-up
def test_a_laptop_offline_for_two_minutes_loses_nothing(laptop_runs: dict[str, LaptopRun]) -> None:
    run = laptop_runs["offline"]
    _loses_nothing(run)
    assert run.report["ssh_remade"] and "tunnel re-opened" in run.stderr, run.stderr[-3000:]


@multihost
@pytest.mark.timeout(900)
def test_a_laptop_asleep_for_two_minutes_loses_nothing(laptop_runs: dict[str, LaptopRun]) -> None:
    run = laptop_runs["sleep"]
    _loses_nothing(run)  # in particular, no worker was declared lost for the silence of the pause
