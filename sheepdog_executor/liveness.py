"""Is a session's client alive? Asked from the head node (the nodes' side of the network) with an
authenticated exchange, not by whether its port accepts connections: any program may listen on the
port of a dead client.

The head node's ``python3`` reads the session's secret file and sends the client's endpoint a signed
heartbeat for a worker nobody runs (the challenge: a fresh nonce); only a client holding the secret can
answer with a body signed for that nonce. The signing code is ``protocol.py`` itself, sent along.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from sheepdog_executor.remote import protocol
from sheepdog_executor.shell import Shell

#: How long the head node waits for the signed answer.
PROBE_SECONDS = 10

_PROBE = """
import http.client, socket, ssl, sys, urllib.parse

def probe(url, secret_path):
    try:
        with open(secret_path, "rb") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        return "unknown", "cannot read the secret file (%s)" % exc.strerror
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if parts.scheme == "https":  # pinned by the answer's signature, not by a certificate authority
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    body = dumps({"worker": "sheepdog-cleanup-probe"})
    header, nonce = sign_request(secret, "POST", "/heartbeat", body)
    try:
        conn.request("POST", "/heartbeat", body=body, headers={AUTH_HEADER: header})
        response = conn.getresponse()
        data = response.read(1 << 16)
    except ConnectionRefusedError:
        return "gone", "connection refused"
    except socket.timeout:  # TimeoutError from Python 3.10 on
        return "unknown", "connected, but no answer within %d s" % TIMEOUT
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            return "unknown", "cannot connect: %s" % (exc.strerror or exc)
        return "gone", "something listens there, but it closed the connection without a signed answer"
    finally:
        conn.close()
    if response.status == 200 and check_response(secret, nonce, data, response.getheader(AUTH_HEADER)):
        return "alive", "it answered a challenge signed with the session's secret"
    return "gone", "something else listens there (HTTP %d, not signed with the session's secret)" % (
        response.status
    )

state, seen = probe(sys.argv[1], sys.argv[2])
print("sheepdog-liveness %s %s" % (state, seen))
"""


def probe_client(shell: Shell, url: str, secret_path: str) -> tuple[str, str]:
    """("alive" | "gone" | "unknown", what was seen) for the client at ``url``, asked from the head
    node with the secret in ``secret_path``. Only a signed answer means alive; a refused connection or
    an answer not signed with the secret means gone; no answer at all (or no python3) is unknown."""
    source = Path(protocol.__file__).read_text() + _PROBE.replace("TIMEOUT", str(PROBE_SECONDS))
    command = f"python3 - {shlex.quote(url)} {shlex.quote(secret_path)}"
    done = shell.run(command, stdin=source.encode(), timeout=PROBE_SECONDS + 30)
    for line in done.stdout.splitlines():
        if line.startswith("sheepdog-liveness "):
            state, _, seen = line.removeprefix("sheepdog-liveness ").partition(" ")
            return state, seen
    text = (done.stderr or done.stdout).strip()
    last = text.splitlines()[-1] if text else f"exit {done.returncode}"
    return "unknown", f"the head node's python3 could not ask it ({last})"
