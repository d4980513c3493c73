"""Approval notifications link to the approval's page in the console (issue 19)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from tests.integration.test_approvals import _approve, _Hook, _request

pytestmark = pytest.mark.integration


@pytest.fixture
def sec(keys):
    return keys.headers("sec", ["security"])


def test_a_notification_links_to_the_approvals_page_in_the_console(make_gateway, dana, sec):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.received.clear()
    try:
        gateway = make_gateway(
            approval_webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook",
            console_public_url="https://console.example.com/",
        )
        approval = _request(gateway, dana, [131])
        _approve(gateway, approval["id"], sec)
        deadline = time.monotonic() + 5
        while len(_Hook.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        link = f"https://console.example.com/approvals/{approval['id']}"
        texts = [m["text"] for m in _Hook.received]
        assert len(texts) == 2 and all(t.endswith(" " + link) for t in texts), texts
    finally:
        server.shutdown()
        server.server_close()
