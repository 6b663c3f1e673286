"""The status page on the real cell: its token, cookie and redirect; JSON that agrees with the map; the
page as headless Chromium renders it (the DOM, and a screenshot taken mid-map)."""

from __future__ import annotations

import http.client
import json
import os
import re
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sheepdog_executor import GridEngineExecutor
from sheepdog_executor.status import StatusPage
from sheepdog_executor.testing import internals

pytestmark = pytest.mark.cluster

#: Where the mid-map screenshot goes (kept after the run, to look at).
SCREENSHOT = Path(os.environ.get("SHEEPDOG_SCREENSHOT", tempfile.gettempdir() + "/sheepdog-status-page.png"))


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    time.sleep(0.5)
    return x * x


def fails_with_markup(x: int) -> int:
    raise ValueError(f"<b>bold</b> & <script>alert({x})</script>")


class Browserless:
    """Plain HTTP requests to the page, redirects not followed."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path  # /status/ID/
        self.token = urllib.parse.parse_qs(parts.query)["token"][0]

    def get(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response

    def json(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        conn.request("GET", f"{self.path}status.json?token={self.token}")
        response = conn.getresponse()
        assert response.status == 200
        data: dict[str, Any] = json.loads(response.read())
        conn.close()
        return data


def test_the_page_needs_its_token(make_executor: Callable[..., GridEngineExecutor]) -> None:
    executor = make_executor(max_workers=1)
    url = executor.status_url
    assert url is not None and re.search(r"/status/[0-9a-f]{16}/\?token=", url)
    page = Browserless(url)
    base = page.path
    secret = internals(executor).endpoint.secret.decode()
    assert page.token not in secret and secret not in url

    for path in (base, base + "status.json", base + "?token=", f"{base}status.json?token={page.token[:-1]}x"):
        assert page.get(path).status == 403, path
    cookie_name = internals(executor).status_page.cookie_name  # type: ignore[union-attr]
    assert page.get(base, {"Cookie": f"{cookie_name}=nope"}).status == 403
    assert page.get(f"{base}?token={page.token}", method="POST").status == 405
    for elsewhere in ("/status", "/status.json", f"/status?token={page.token}"):
        assert page.get(elsewhere).status == 404, elsewhere

    # the token is traded for a strict cookie, and the URL loses it
    first = page.get(f"{base}?token={page.token}")
    assert first.status == 303 and first.getheader("Location") == base
    set_cookie = first.getheader("Set-Cookie") or ""
    assert set_cookie.startswith(f"{cookie_name}={page.token};")
    # scoped to the page: a browser sends it to no other path of the host (cookies ignore ports)
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in set_cookie.split(";")[1:]}
    assert attributes["path"] == f"Path={base}" and attributes["samesite"] == "SameSite=Strict"
    assert "httponly" in attributes
    cookie = {"Cookie": f"{cookie_name}={page.token}"}
    html = page.get(base, cookie)
    assert html.status == 200 and html.getheader("Content-Type", "").startswith("text/html")
    assert "script-src 'nonce-" in (html.getheader("Content-Security-Policy") or "")
    assert html.getheader("Cache-Control") == "no-store"
    assert page.get(base + "status.json", cookie).status == 200

    # another executor: another token and cookie; without the page, nothing is served
    other = make_executor(max_workers=1, status_page=False)
    assert other.status_url is None
    bare = Browserless(executor.status_url.replace(str(page.port), str(internals(other).endpoint.port)))
    assert bare.get(f"{base}?token={page.token}").status == 404
    two = [StatusPage(dict) for _ in range(2)]
    assert two[0].path != two[1].path and two[0].cookie_name != two[1].cookie_name


def test_json_agrees_with_the_map(make_executor: Callable[..., GridEngineExecutor]) -> None:
    executor = make_executor()
    page = Browserless(executor.status_url or "")
    assert list(executor.map(square, range(200), timeout=120)) == [x * x for x in range(200)]
    failing = executor.submit(fails_with_markup, 1)
    with pytest.raises(ValueError):
        failing.result(timeout=60)

    data = page.json()
    assert set(executor.status()) <= set(data)
    assert data["jobs"] == executor.job_ids and data["broken"] is None
    batch = next(b for b in data["batches"] if b["label"] == "map(square)")
    assert batch["total"] == batch["done"] == 200
    assert batch["queued"] == batch["running"] == batch["failed"] == batch["cancelled"] == 0
    assert sum(batch["hosts"].values()) == 200 and batch["finished"] is not None
    assert batch["max_seconds"] >= batch["mean_seconds"] >= 0
    submitted = next(b for b in data["batches"] if b["label"] == "submit(fails_with_markup)")
    assert submitted["failed"] == submitted["total"] == 1
    assert any("<script>alert(1)</script>" in e["error"] for e in data["errors"])  # raw in JSON


def test_the_page_in_chromium(
    make_executor: Callable[..., GridEngineExecutor], chromium: Callable[..., str]
) -> None:
    executor = make_executor()
    url = executor.status_url or ""
    failing = executor.submit(fails_with_markup, 7)
    results = executor.map(slow_square, range(96))  # 6 s or more on the 8 slots
    page = Browserless(url)
    deadline = time.monotonic() + 120
    while not any(b["label"] == "map(slow_square)" and b["done"] >= 8 for b in page.json()["batches"]):
        assert time.monotonic() < deadline, page.json()
        time.sleep(0.2)
    SCREENSHOT.unlink(missing_ok=True)
    chromium(url, f"--screenshot={SCREENSHOT}")  # mid-map: a bar part way, workers, the error
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and SCREENSHOT.stat().st_size > 20_000

    assert list(results) == [x * x for x in range(96)]
    with pytest.raises(ValueError):
        failing.result(timeout=60)
    dom = chromium(url, "--dump-dom")
    card = re.search(r'<article class="card batch"[^>]*data-total="96"[^>]*>.*?</article>', dom, re.S)
    assert card is not None, dom[:3000]
    assert 'data-done="96"' in card.group(0) and "map(slow_square)" in card.group(0)
    assert "96 / 96 · 100%" in card.group(0)
    for job in executor.job_ids:
        assert f'data-job="{job}"' in dom
    assert "scheduler commands/min" in dom  # counted: polls, submits, accounting
    # the error's markup is shown as text, never parsed
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;alert(7)&lt;/script&gt;" in dom
    assert "<b>bold</b>" not in dom and "alert(7)</script>" not in dom
