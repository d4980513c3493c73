"""The console over HTTP with real PostgreSQL and OPA, no browser: it fails closed when
policy cannot answer, refuses what is not signed in, and shows the gateway's refusals by
their codes (never a 500)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from app.config import load_settings
from app.console.web import create_console_app
from app.devstack import Postgres, free_port, prepare_console_database
from tests.integration.test_console_index import sealed, write_jsonl

pytestmark = pytest.mark.integration


class Console:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Console:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "console did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def make_console(postgres: Postgres, opa, tmp_path_factory) -> Iterator[Callable[..., Console]]:
    started: list[Console] = []
    root = tmp_path_factory.mktemp("console-web")
    source = root / "audit.jsonl"
    write_jsonl(source, sealed(30, instance="gw-web"))
    dsn = prepare_console_database(postgres.admin_dsn, f"qg_console_web_{os.getpid()}")

    def make(**overrides: Any) -> Console:
        values: dict[str, Any] = {
            "environment": "staging", "dev_mode": True,
            "dev_signing_key_file": root / "dev-key.pem", "opa_url": opa.url,
            "console_database_url": dsn, "console_audit_file": source,
            "console_ingest_poll_ms": 50,
        }
        values.update(overrides)
        console = Console(create_console_app(load_settings(**values))).start()
        started.append(console)
        return console

    yield make
    for console in started:
        console.stop()


def _signed_in(console: Console, sub: str) -> contextlib.closing[httpx.Client]:
    client = httpx.Client(base_url=console.url, timeout=10)
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text
    answer = client.post("/login/dev", data={"csrf": csrf.group(1), "sub": sub})
    assert answer.status_code == 303 and answer.headers["location"] == "/events"
    return contextlib.closing(client)


def test_policy_that_cannot_answer_shows_nothing(make_console):
    down = make_console(opa_url=f"http://127.0.0.1:{free_port()}")
    with _signed_in(down, "sec") as client:
        page = client.get("/events")
        assert page.status_code == 503 and "policy_unavailable" in page.text
        assert "gw-web" not in page.text  # no event on a refusal
    undefined = make_console(console_opa_path="querygate/console/nothing_here")
    with _signed_in(undefined, "sec") as client:
        page = client.get("/events")
        assert page.status_code == 403 and "console_denied" in page.text
        assert "gw-web" not in page.text


def test_nothing_without_signing_in(make_console):
    console = make_console()
    with httpx.Client(base_url=console.url, timeout=10) as client:
        for path in ("/events", "/touch", "/health", "/approvals", "/events/gw-web/x/1"):
            answer = client.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == "/login", path
        refused = client.post("/approvals/00000000-0000-0000-0000-000000000000/approve",
                              data={"csrf": "x"})
        assert refused.status_code == 401 and "signin_required" in refused.text
        assert client.get("/readyz").json()["status"] == "ready"


def test_the_dev_sign_in_is_refused_outside_dev_mode(make_console):
    console = make_console(dev_mode=False, console_public_url="https://console.test")
    with httpx.Client(base_url=console.url, timeout=10) as client:
        login = client.get("/login")
        assert login.status_code == 200 and 'id="dev-signin"' not in login.text
        refused = client.post("/login/dev", data={"sub": "sec"})
        assert refused.status_code == 404 and "dev_signin_disabled" in refused.text
        # Outside loopback dev the cookie is __Host- and Secure.
        cookie = login.headers["set-cookie"]
        assert cookie.startswith("__Host-qg_console=") and "Secure" in cookie
        assert "HttpOnly" in cookie and "SameSite=lax" in cookie


def test_a_gateway_refusal_is_shown_by_its_code(make_console, gateway):
    # The test gateway trusts another issuer than the dev sign-in's: it answers 401.
    console = make_console(console_gateway_url=gateway.url)
    with _signed_in(console, "sec") as client:
        inbox = client.get("/approvals/inbox")
        assert inbox.status_code == 200 and "invalid_token" in inbox.text
        one = client.get("/approvals/00000000-0000-0000-0000-000000000000")
        assert one.status_code == 401 and "invalid_token" in one.text
    unreachable = make_console(console_gateway_url=f"http://127.0.0.1:{free_port()}")
    with _signed_in(unreachable, "sec") as client:
        one = client.get("/approvals/00000000-0000-0000-0000-000000000000")
        assert one.status_code == 503 and "gateway_unavailable" in one.text


def test_alice_sees_her_own_events_only_over_http(make_console):
    console = make_console()
    deadline = time.monotonic() + 10
    with _signed_in(console, "sec") as sec, _signed_in(console, "alice") as alice:
        while "gw-web" not in sec.get("/events").text:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        everyone = set(re.findall(r"<td>(alice|dana|sam)", sec.get("/events").text))
        assert everyone == {"alice", "dana", "sam"}
        own = set(re.findall(r"<td>(alice|dana|sam)", alice.get("/events").text))
        assert own == {"alice"}
        assert alice.get("/health").status_code == 403
        exported = alice.get("/touch.json", params={"identity": "dana"}).json()
        assert exported["tables_read"] == [] and exported["identity"] == "dana"

