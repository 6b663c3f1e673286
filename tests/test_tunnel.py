"""Reaching the client through the SSH connection, on the real cell.

The client runs in a network namespace of its own, joined to the machine by a veth pair. Routing on
the machine's side sends nothing to the namespace but the replies of two extra sshd instances started
here (one allowing TCP forwarding, one not): the cell's nodes cannot connect to the client, as from a
laptop behind NAT. Everything made here (namespace, link, route, rule, sshd) is removed afterwards,
also when a test fails.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import our_jobs, read_line, require_netns, ssh, wait_until

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.dispatch import Dispatcher
from sheepdog_executor.errors import ConfigurationError
from sheepdog_executor.remote import worker
from sheepdog_executor.server import Endpoint
from sheepdog_executor.shell import LocalShell
from sheepdog_executor.testing import internals
from sheepdog_executor.tls import make_certificate
from sheepdog_executor.tunnel import choose_route

cluster = pytest.mark.cluster

TEST_USER = os.environ.get("SHEEPDOG_TEST_USER", "sdtest")
KEY = "/root/.ssh/sheepdog_test_ed25519"


def square(x: int) -> int:
    return x * x


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", "netns", "exec", netns, "ip", *args] if netns else ["ip", *args]
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=30)


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


@dataclass
class Isolated:
    """A client namespace the cell cannot route to, and sshd aliases reachable from it."""

    netns: str
    client_address: str
    home: Path  # HOME of the client: its ~/.ssh/config and known_hosts
    job_name: str

    def run_client(self, host: str, timeout: float = 240, **options: Any) -> dict[str, Any]:
        """Run CLIENT in the namespace: a map of square over 20 numbers; returns its JSON report."""
        env = {**os.environ, "HOME": str(self.home), "PYTHONPATH": os.pathsep.join(sys.path)}
        options = {"job_name": self.job_name, "max_workers": 4, "poll_interval": 0.5, **options}
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", CLIENT, host, json.dumps(options)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        assert lines, f"client gave no report (exit {done.returncode}):\n{done.stderr[-3000:]}"
        report: dict[str, Any] = json.loads(lines[-1])
        report["stderr"] = done.stderr
        return report


CLIENT = textwrap.dedent(
    """
    import json, logging, subprocess, sys, traceback
    from sheepdog_executor import GridEngineExecutor
    from sheepdog_executor.testing import internals
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("sheepdog_executor").setLevel(logging.INFO)
    report = {}
    try:
        with GridEngineExecutor(host=sys.argv[1], **json.loads(sys.argv[2])) as executor:
            report["url"] = internals(executor).launch.url
            report["jobs"] = executor.job_ids
            listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
            report["listening"] = [line.split()[3] for line in listening.splitlines()]
            report["result"] = list(executor.map(lambda x: x * x, range(20), timeout=180))
            report["jobs"] = executor.job_ids
    except BaseException as exc:
        report["error_type"] = type(exc).__name__
        report["error"] = str(exc)
        traceback.print_exc()
    print(json.dumps(report))
    """
)


def _unused_subnet() -> tuple[str, str]:
    """Two addresses of a /30 that nothing on this machine uses (other tests may run at once)."""
    used = ip("-4", "addr").stdout + ip("-4", "route", "show", "table", "all").stdout
    for _ in range(100):
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        if f"{prefix}." not in used:
            base = 4 * random.randint(0, 63)
            return f"{prefix}.{base + 1}", f"{prefix}.{base + 2}"
    raise RuntimeError("no unused private subnet found")


def _start_sshd(directory: Path, address: str, forwarding: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port(address)
    name = "fwd" if forwarding else "nofwd"
    config = directory / f"sshd-{name}.conf"
    config.write_text(
        textwrap.dedent(
            f"""\
            Port {port}
            ListenAddress {address}
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PubkeyAuthentication yes
            UsePAM no
            PermitRootLogin no
            AllowUsers {TEST_USER}
            AllowTcpForwarding {"yes" if forwarding else "no"}
            Subsystem sftp internal-sftp
            PidFile {directory}/sshd-{name}.pid
            """
        )
    )
    log = open(directory / f"sshd-{name}.log", "wb")  # noqa: SIM115 - lives as long as the sshd
    process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return process, port
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(
        f"sshd on {address}:{port} did not start: {(directory / f'sshd-{name}.log').read_text()}"
    )


@pytest.fixture(scope="module")
def isolated(cell: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Isolated]:
    require_netns()
    tag = uuid.uuid4().hex[:6]
    netns, outer, inner = f"sdt-{tag}", f"sdta{tag}", f"sdtb{tag}"
    table = str(random.randint(30000, 39999))
    priority = str(random.randint(20000, 29999))  # before the main table (32766)
    host_address, client_address = _unused_subnet()
    directory = tmp_path_factory.mktemp(f"netns-{tag}")
    undo: list[list[str]] = []
    daemons: list[subprocess.Popen[bytes]] = []
    job_name = f"sdtun-{tag}"
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a run killed with SIGTERM still cleans up

    def step(do: list[str], undo_with: list[str] | None = None, netns_: str | None = None) -> None:
        ip(*do, netns=netns_)
        if undo_with is not None:
            undo.append(undo_with)

    try:
        step(["netns", "add", netns], ["netns", "delete", netns])
        step(["link", "add", outer, "type", "veth", "peer", "name", inner], ["link", "delete", outer])
        step(["link", "set", inner, "netns", netns])
        step(["addr", "add", f"{host_address}/30", "dev", outer])
        step(["link", "set", outer, "up"])
        step(["addr", "add", f"{client_address}/30", "dev", inner], netns_=netns)
        step(["link", "set", inner, "up"], netns_=netns)
        step(["link", "set", "lo", "up"], netns_=netns)
        # the machine may not send anything to the client ...
        step(
            ["route", "add", "unreachable", f"{client_address}/32"],
            ["route", "delete", "unreachable", f"{client_address}/32"],
        )
        # ... but the replies of the sshd instances started here, found through a table of their own
        step(
            ["route", "add", f"{client_address}/32", "dev", outer, "table", table],
            ["route", "flush", "table", table],
        )
        ports = []
        for forwarding in (True, False):
            process, port = _start_sshd(directory, host_address, forwarding)
            daemons.append(process)
            ports.append(port)
            rule = ["from", host_address, "ipproto", "tcp", "sport", str(port), "lookup", table]
            step(
                ["rule", "add", *rule, "priority", priority], ["rule", "delete", *rule, "priority", priority]
            )

        home = directory / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        (home / ".ssh" / "config").write_text(
            "".join(
                f"Host {alias}\n    HostName {host_address}\n    Port {port}\n    User {TEST_USER}\n"
                f"    IdentityFile {KEY}\n"
                for alias, port in (("cell-fwd", ports[0]), ("cell-nofwd", ports[1]))
            )
        )
        keys = [Path(k).read_text().split()[:2] for k in sorted(Path("/etc/ssh").glob("ssh_host_*_key.pub"))]
        (home / ".ssh" / "known_hosts").write_text(
            "".join(f"[{host_address}]:{port} {kind} {key}\n" for port in ports for kind, key in keys)
        )
        # the premise: from the cell's side, the client's address is unreachable
        with pytest.raises(OSError):
            socket.create_connection((client_address, 22), timeout=3).close()
        yield Isolated(netns, client_address, home, job_name)
    finally:
        for process in daemons:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        _remove_jobs_named(job_name)
        for command in reversed(undo):
            ip(*command, check=False)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _remove_jobs_named(name: str) -> None:
    """qdel what a killed client may have left: only jobs with this run's unique name."""
    out = ssh('qstat -xml -u "$(id -un)"').stdout
    try:
        ids = [
            entry.findtext("JB_job_number") or ""
            for entry in ET.fromstring(out).iter("job_list")
            if entry.findtext("JB_name") == name
        ]
    except ET.ParseError:
        return
    if ids:
        ssh("qdel " + " ".join(sorted(set(ids))))


# -- through the namespace ----------------------------------------------------------------------


@cluster
def test_auto_goes_through_the_tunnel_and_opens_no_port(isolated: Isolated) -> None:
    report = isolated.run_client("cell-fwd", callback="auto")
    assert report.get("result") == [x * x for x in range(20)], report["stderr"][-3000:]
    assert isolated.client_address not in report["url"]
    assert "direct connection impossible" in report["stderr"]
    # nothing in the client's namespace listens on anything but loopback
    assert report["listening"], report
    assert all(address.startswith("127.") for address in report["listening"]), report["listening"]
    assert not our_jobs(set(report["jobs"]))


@cluster
def test_tunnel_with_tls(isolated: Isolated) -> None:
    report = isolated.run_client("cell-fwd", callback="tunnel", tls=True)
    assert report.get("result") == [x * x for x in range(20)], report["stderr"][-3000:]
    assert report["url"].startswith("https://")


@cluster
def test_direct_fails_with_a_clear_error(isolated: Isolated) -> None:
    report = isolated.run_client("cell-fwd", callback="direct", timeout=280)
    assert report.get("error_type") == "WorkerStartFailed", report
    assert "without ever reaching this client" in report["error"]
    assert "No route to host" in report["error"]  # the worker's own words, from its stderr
    assert isolated.client_address in report["error"]  # names the address the nodes could not reach
    assert not our_jobs(set(report["jobs"]))


@cluster
@pytest.mark.parametrize("callback", ["tunnel", "auto"])
def test_forbidden_forwarding_fails_with_a_clear_error(isolated: Isolated, callback: str) -> None:
    report = isolated.run_client("cell-nofwd", callback=callback, timeout=120)
    assert report.get("error_type") == "ConnectionFailed", report
    assert "AllowTcpForwarding" in report["error"]
    if callback == "auto":
        assert "cannot connect to this machine directly" in report["error"]
        assert isolated.client_address in report["error"]


# -- in this process ----------------------------------------------------------------------------


def _relay_pid(port: int) -> str | None:
    """The pid of the process listening on this port of the machine (the head node), if any."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    found = [part for part in out.replace(",", " ").split() if part.startswith("pid=")]
    return found[0] if found else None


@cluster
def test_tunnel_survives_a_reconnect_and_goes_away_with_the_executor(
    make_executor: Callable[..., GridEngineExecutor],
) -> None:
    executor = make_executor(callback="tunnel", max_workers=2)
    try:
        _reconnect_and_close(executor)
    except BaseException:
        executor.abort()  # calls lost with the connection must not hang the teardown
        raise


def _reconnect_and_close(executor: GridEngineExecutor) -> None:
    relay_port = int(internals(executor).launch.url.rsplit(":", 1)[1])
    first_relay = _relay_pid(relay_port)
    assert first_relay is not None
    assert list(executor.map(square, range(10), timeout=120)) == [x * x for x in range(10)]
    # drop the SSH connection under it: the relay ends with it; once the connection is re-opened,
    # the tunnel is made again on the same ports, so the URL the jobs carry still works
    internals(executor).shell.transport().close()
    internals(executor).shell.run("true")  # reconnects now rather than at the next poll
    wait = time.monotonic() + 30
    while _relay_pid(relay_port) in (None, first_relay) and time.monotonic() < wait:
        time.sleep(0.2)
    assert _relay_pid(relay_port) not in (None, first_relay), "the relay was not started again"
    assert list(executor.map(square, range(10, 20), timeout=180)) == [x * x for x in range(10, 20)]
    executor.shutdown(wait=True)
    wait = time.monotonic() + 20
    while _relay_pid(relay_port) is not None and time.monotonic() < wait:
        time.sleep(0.2)
    assert _relay_pid(relay_port) is None, "the relay outlived its executor"


@cluster
def test_relay_port_taken_after_an_ssh_drop(
    make_executor: Callable[..., GridEngineExecutor], cell: str
) -> None:
    """Another user binds the relay's port while the connection is down: the relay is re-made on
    another port, the workers learn it from the session's routes file, and no call fails."""
    executor = make_executor(callback="tunnel", max_workers=4)
    session = internals(executor)
    old_port = session.routes[-1][2]
    results = executor.map(square, range(400))
    wait_until(lambda: executor.status()["workers"], 120, "workers running")
    squatter = None
    with session.shell._lock:  # no reconnect (hence no new relay) until the port is taken
        session.shell._client.get_transport().close()
        wait_until(lambda: _relay_pid(old_port) is None, 30, "the relay ended with the connection")
        squatter = subprocess.Popen(
            ["ssh", "-o", "BatchMode=yes", cell, "exec python3 -c " + shlex.quote(SQUAT), str(old_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        assert read_line(squatter, 60, "the squatter's word").strip() == "bound"
        assert list(results) == [x * x for x in range(400)]
        # the map may have ended before the drop: the relay is re-made at the next reconnect anyway
        wait_until(lambda: session.routes[-1][2] != old_port, 60, "the relay re-made on another port")
        new_port = session.routes[-1][2]
        assert new_port != old_port and _relay_pid(new_port) is not None
        routes = ssh(f"cat {session.session_dir}/routes").stdout
        assert f":{new_port}" in routes, routes
    finally:
        squatter.kill()


#: Another user's server on the relay's old port: it takes connections and drops them. (It may
#: have to wait until connections of the old relay in their closing states let go of the port.)
SQUAT = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
for _ in range(300):
    try:
        s.bind(("", int(sys.argv[1])))
        break
    except OSError:
        time.sleep(0.1)
s.listen()
print("bound", flush=True)
s.settimeout(120)
while True:
    s.accept()[0].close()
"""


# -- without the cell -----------------------------------------------------------------------------


def test_route_choice_without_ssh() -> None:
    shell = LocalShell()
    route = choose_route(shell, "auto", "127.0.0.1", 0)
    assert (route.mode, route.listen_address) == ("direct", "127.0.0.1")
    with pytest.raises(ConfigurationError, match="needs an SSH connection"):
        choose_route(shell, "tunnel", "127.0.0.1")
    with pytest.raises(ConfigurationError, match="callback must be one of"):
        choose_route(shell, "carrier-pigeon", "127.0.0.1")


def test_pinned_certificate(tmp_path: Path) -> None:
    """A worker's channel talks to the endpoint with the fingerprint it was given, and to no other."""
    certificate = make_certificate()
    secret = os.urandom(32).hex().encode()
    endpoint = Endpoint(Dispatcher(), secret, address="127.0.0.1", ssl_context=certificate.server_context())
    endpoint.start()
    try:
        url = f"https://127.0.0.1:{endpoint.port}"
        good = worker.Channel(url, secret, certificate.fingerprint)
        assert good.call("/heartbeat", {"worker": "w"}) == {"known": False}
        good.close()
        for wrong in (make_certificate().fingerprint, None):
            with pytest.raises(worker.Refused, match="not the client's"):
                worker.Channel(url, secret, wrong).call("/heartbeat", {"worker": "w"})
        with pytest.raises(OSError):  # plain HTTP to it gets nowhere
            worker.Channel(f"http://127.0.0.1:{endpoint.port}", secret).call("/heartbeat", {}, attempts=1)
    finally:
        endpoint.stop()
