"""The status page: a live view of an executor in the user's browser, served by its endpoint.

The endpoint listens where the workers can reach it, possibly a non-loopback address, so the page is
locked by its own random token (never the workers' secret). The token comes once in the URL
(``/status/ID/?token=...``) and is traded for an HttpOnly, SameSite=Strict cookie and a redirect, so
it leaves the address bar and the history. The cookie's name and its Path (``/status/ID/``, ID random
per executor) are the page's own: browsers send cookies to every port of a host, so any other
service there would otherwise receive it. ``/status/ID/status.json`` takes the cookie or the token;
anything else gets 403. The page itself (``status_page.html``) polls ``status.json`` every second.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

import tornado.web

from sheepdog_executor import httpserver
from sheepdog_executor.server import _Quiet

#: Placeholders in the page: the per-response CSP nonce and the first snapshot (no wait for a poll).
_NONCE_MARK = "__NONCE__"
_INITIAL_MARK = "__INITIAL_STATUS__"

_CSP = (
    "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@cache
def _template() -> str:
    return resources.files("sheepdog_executor").joinpath("status_page.html").read_text(encoding="utf-8")


class StatusPage:
    """The page's token and data source; ``routes()`` go into the endpoint's Application."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], title: str = "") -> None:
        self.snapshot = snapshot
        self.title = title
        self.token = secrets.token_urlsafe(32)
        # cookies ignore ports: the cookie goes only to this page's own path, and two executors on
        # one host must not overwrite each other's
        page_id = secrets.token_hex(8)
        self.path = f"/status/{page_id}/"
        self.cookie_name = f"sheepdog_status_{page_id}"

    def valid(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    def url(self, scheme: str, host: str, port: int) -> str:
        """The page's address with its token; a wildcard listen address is reached on loopback."""
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        return f"{scheme}://{host}:{port}{self.path}?token={self.token}"

    def data(self) -> dict[str, Any]:
        return {**self.snapshot(), "title": self.title, "now": time.time()}

    def routes(self) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
        return [(self.path, _Page, {"page": self}), (self.path + r"status\.json", _Json, {"page": self})]


class _StatusHandler(_Quiet):
    """GET only; 403 without the token or its cookie; nothing cached, framed or referred."""

    page: StatusPage

    def initialize(self, page: StatusPage) -> None:
        self.page = page

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Cache-Control", "no-store")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cross-Origin-Resource-Policy", "same-origin")

    def token_in_url(self) -> bool:
        """Authenticate (403); True when the token came in the URL rather than in the cookie."""
        presented = self.get_query_argument("token", None)
        if presented is not None:
            if not self.page.valid(presented):
                raise tornado.web.HTTPError(403)
            httpserver.trust(self.request.connection.stream)  # type: ignore[union-attr]
            return True
        if not self.page.valid(self.get_cookie(self.page.cookie_name)):
            raise tornado.web.HTTPError(403)
        httpserver.trust(self.request.connection.stream)  # type: ignore[union-attr]
        return False

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code != 403:
            return super().write_error(status_code, **kwargs)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("403: open the status page with its token, as in executor.status_url\n")


class _Page(_StatusHandler):
    def get(self) -> None:
        if self.token_in_url():
            self.set_cookie(
                self.page.cookie_name,
                self.page.token,
                path=self.page.path,
                httponly=True,
                samesite="Strict",
                secure=self.request.protocol == "https",
            )
            self.redirect(self.request.path, status=303)
            return
        nonce = secrets.token_urlsafe(16)
        initial = json.dumps(self.page.data(), default=str)
        # inside <script type="application/json">: no "<", ">" or "&" may end the element early
        initial = initial.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", _CSP.format(nonce=nonce))
        self.finish(_template().replace(_NONCE_MARK, nonce).replace(_INITIAL_MARK, initial))


class _Json(_StatusHandler):
    def get(self) -> None:
        self.token_in_url()
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(self.page.data(), default=str))
