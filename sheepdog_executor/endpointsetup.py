"""The session's endpoint step: how the workers reach this client (direct, or through an SSH
tunnel to the head node), the endpoint started there, TLS when it is asked for or the route goes
through the head node's relay, and the status page on the same endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from sheepdog_executor.options import ExecutorOptions
from sheepdog_executor.server import Endpoint
from sheepdog_executor.shell import Shell
from sheepdog_executor.status import StatusPage
from sheepdog_executor.tunnel import Route, choose_route

if TYPE_CHECKING:
    from sheepdog_executor.dispatch import Dispatcher
    from sheepdog_executor.tls import Certificate


class Opened(NamedTuple):
    """What the endpoint step hands back: the endpoint and the workers' routes to it."""

    endpoint: Endpoint
    route: Route
    #: (label, host, port) of each way the workers may reach us, best first
    routes: list[tuple[str, str, int]]
    certificate: Certificate | None
    status_page: StatusPage | None


def open_endpoint(
    shell: Shell,
    dispatcher: Dispatcher,
    status: Callable[[], dict[str, Any]],
    secret: bytes,
    options: ExecutorOptions,
    tunnel_moved: Callable[[str, int, bool], None],
) -> Opened:
    """Decide how workers reach us (direct or SSH tunnel), start the endpoint there and open the
    routes (``tunnel_moved``: told when the tunnel is re-made). With TLS (``tls=True``; by
    default, on the routes through the head node's relay, which other users share) a certificate
    they pin by its fingerprint, which goes on their command line: it is not secret, only the
    secret file is. The status page (``status``: its snapshot) is served by the same endpoint."""
    tls = options.tls
    address = options.callback_address or shell.callback_address()
    route = choose_route(shell, options.callback, address, options.callback_port)
    certificate = None
    try:
        if tls or (tls is None and route.through_head_node):
            # imported here: without paramiko (LocalShell, tls=True) cryptography costs 0.5 s
            from sheepdog_executor.tls import make_certificate

            certificate = make_certificate()
        context = certificate.server_context() if certificate else None
        page = StatusPage(status, shell.description) if options.status_page else None
        endpoint = Endpoint(
            dispatcher,
            secret,
            address=route.listen_address,
            port=route.listen_port,
            ssl_context=context if tls else None,
            routes=page.routes() if page else (),
            tunnel_ssl=context if tls is None else None,
        )
        endpoint.start()
    except BaseException:
        route.discard()
        raise
    try:
        routes = route.open(shell, endpoint, tunnel_moved)
    except BaseException:
        endpoint.stop()
        raise
    return Opened(endpoint, route, routes, certificate, page)
