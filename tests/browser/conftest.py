"""`make run`'s stack (``querygate dev``: embedded PostgreSQL, OPA, the gateway, the console and
its dev OIDC provider) and real headless Chromium driving it.

The browser is Debian's ``chromium`` through Debian's ``chromedriver`` (``make browser``),
both passed by path, so Selenium Manager never looks for, or downloads, anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.devstack import find_opa, free_port, interrupt_group
from tests.conftest import REPO

CHROMIUM = os.environ.get("QUERYGATE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("QUERYGATE_CHROMEDRIVER", "/usr/bin/chromedriver")
# The flags the machine needs (docs/console.md): no sandbox as root, and no background
# connections to Google's hosts, which the closed network refuses.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
)


@dataclass
class Stack:
    """The URLs of a running `querygate dev` and its demo tokens."""

    gateway: str
    console: str
    idp: str
    tokens: dict[str, str]
    log: Path
    audit_file: Path
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def query(self, who: str, sql: str, params: list[object] | None = None,
              approval_id: str | None = None) -> httpx.Response:
        body: dict[str, object] = {"sql": sql, "params": params or []}
        if approval_id is not None:
            body["approval_id"] = approval_id
        return self.client.post(f"{self.gateway}/v1/query", json=body,
                                headers={"authorization": f"Bearer {self.tokens[who]}"})


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready: " + log.read_text()[-4000:]
        time.sleep(0.3)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`querygate dev` — what `make run` runs — on free ports, in a data dir of its own."""
    data = tmp_path_factory.mktemp("make-run")
    ports = {name: str(free_port()) for name in ("gw", "pg", "console", "idp")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYGATE_")}
    env.update({
        "QUERYGATE_PORT": ports["gw"], "QUERYGATE_PG_PORT": ports["pg"],
        "QUERYGATE_CONSOLE_PORT": ports["console"],
        "QUERYGATE_CONSOLE_DEV_IDP_PORT": ports["idp"],
        "QUERYGATE_LOG_LEVEL": "warning",
    })
    log = data / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # what `make run` runs, from this checkout
            [sys.executable, "-m", "app.cli", "dev", "--data-dir", str(data / "state"),
             "--opa-bin", find_opa()],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        gateway = f"http://127.0.0.1:{ports['gw']}"
        console = f"http://127.0.0.1:{ports['console']}"
        _wait(f"{gateway}/readyz", proc, log, 180)
        _wait(f"{console}/readyz", proc, log, 60)
        tokens = json.loads((data / "state" / "dev" / "tokens.json").read_text())
        assert f"Console: {console}" in log.read_text()
        running = Stack(gateway, console, f"http://127.0.0.1:{ports['idp']}", tokens, log,
                        data / "state" / "audit" / "audit.jsonl")
        yield running
        running.client.close()
    finally:
        interrupt_group(proc, 60)


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], object]]:
    """New headless Chromium sessions, each with an empty profile; all quit at the end."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"no {CHROMIUM} / {CHROMEDRIVER}: run `make browser` (Debian's chromium "
                    "and chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never a download
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[webdriver.Chrome] = []

    def make() -> webdriver.Chrome:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium')}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.implicitly_wait(0)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()
