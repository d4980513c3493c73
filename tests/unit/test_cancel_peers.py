"""CancelPeers (app/pgwire/server.py): how worker processes pass cancel keys, on real Unix
sockets in a temporary directory (the two workers are two CancelPeers in one process)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from app.config import load_settings
from app.pgwire import server


def _peers(monkeypatch: pytest.MonkeyPatch, tmp: Path, pid: int,
           cancelled: list[tuple[int, int, int]]) -> server.CancelPeers:
    monkeypatch.setattr(server.tempfile, "gettempdir", lambda: str(tmp))
    monkeypatch.setattr(server.os, "getpid", lambda: pid)
    settings = load_settings(pg_port=5433, workers=2, mask_hmac_key="k" * 32)

    async def cancel(key_pid: int, secret: int) -> None:
        cancelled.append((pid, key_pid, secret))

    return server.CancelPeers(settings, cancel)


def test_a_key_is_passed_to_every_other_worker_and_to_no_one_else(monkeypatch, tmp_path):
    cancelled: list[tuple[int, int, int]] = []

    async def run() -> None:
        one = _peers(monkeypatch, tmp_path, 101, cancelled)
        two = _peers(monkeypatch, tmp_path, 202, cancelled)
        three = _peers(monkeypatch, tmp_path, 303, cancelled)
        for peers in (one, two, three):
            await peers.start()
        assert oct(os.stat(one.directory).st_mode & 0o777) == "0o700"
        assert oct(os.stat(one.path).st_mode & 0o777) == "0o600"
        (one.directory / "999.sock").touch()  # a dead worker's socket: skipped
        await one.pass_on(7, 4_000_000_000)
        for _ in range(100):
            if len(cancelled) == 2:
                break
            await asyncio.sleep(0.01)
        for peers in (one, two, three):
            await peers.close()
        assert not one.path.exists()

    asyncio.run(run())
    assert sorted(cancelled) == [(202, 7, 4_000_000_000), (303, 7, 4_000_000_000)]


def test_a_directory_others_may_write_turns_passing_off(monkeypatch, tmp_path, caplog):
    cancelled: list[tuple[int, int, int]] = []

    async def run() -> None:
        one = _peers(monkeypatch, tmp_path, 101, cancelled)
        one.directory.mkdir(mode=0o777)
        os.chmod(one.directory, 0o777)  # another user could plant a socket there
        await one.start()
        await one.pass_on(7, 8)
        assert not one.path.exists()
        await one.close()

    asyncio.run(run())
    assert cancelled == []
    assert "reaches only the worker it lands on" in caplog.text
