"""The real components on one machine: embedded PostgreSQL (pgserver) and an OPA process.

Used by ``querygate dev`` (``make run``) and by the integration-test fixtures, so both start
the stack the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app.demo import load_demo

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_ROLE = "querygate"
APP_DATABASE = "appdb"


class StackError(RuntimeError):
    """A component of the local stack could not be started."""


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_opa(explicit: str | None = None) -> str:
    """The opa binary: explicit, $QUERYGATE_OPA_BIN, the Makefile's bin/opa, then PATH."""
    candidates = [explicit, os.environ.get("QUERYGATE_OPA_BIN"), str(REPO_ROOT / "bin" / "opa")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("opa")
    if on_path:
        return on_path
    raise StackError("no opa binary: run `make bin/opa` or set QUERYGATE_OPA_BIN")


def wait_http(url: str, timeout_s: float = 30.0, expect: int = 200) -> None:
    """Poll ``url`` until it answers ``expect``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == expect:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise StackError(f"{url} did not answer {expect} within {timeout_s:.0f}s (last: {last})")


@dataclass
class OpaProcess:
    """A running ``opa run --server``."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


def start_opa(
    paths: list[Path] | None = None,
    port: int | None = None,
    opa_bin: str | None = None,
    extra_args: list[str] | None = None,
) -> OpaProcess:
    """Start OPA on loopback with the given policy paths (default rego/) and wait for it."""
    port = port or free_port()
    binary = find_opa(opa_bin)
    args = [
        binary,
        "run",
        "--server",
        "--addr",
        f"127.0.0.1:{port}",
        "--log-level",
        "error",
        "--disable-telemetry",
        *(extra_args or []),
        *(str(p) for p in (paths or [REPO_ROOT / "rego"])),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", timeout_s=30)
    except StackError:
        process.kill()
        _, err = process.communicate()
        raise StackError(f"OPA did not start: {err.decode(errors='replace')[-2000:]}") from None
    return OpaProcess(process, url)


@dataclass
class Postgres:
    """An embedded PostgreSQL server and the DSNs to reach it."""

    server: Any
    admin_dsn: str
    app_dsn: str

    def stop(self) -> None:
        """Stop the server even if pgserver still counts a dead process as a user of it."""
        from pgserver.postgres_server import pg_ctl

        # Ctrl-C in a terminal signals the whole process group, postgres included: the server
        # may already be shutting down, and pgserver's own pg_ctl stop then fails.
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            self.server.cleanup()
        info = getattr(self.server, "_postmaster_info", None)
        pid_file = Path(self.server.pgdata) / "postmaster.pid"
        if info is not None and info.process.is_running() and pid_file.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                pg_ctl(
                    ["-w", "stop", "-m", "fast"],
                    pgdata=self.server.pgdata,
                    user=self.server.system_user,
                )


def start_postgres(data_dir: Path, demo: bool = True) -> Postgres:
    """Start (or reuse) a pgserver cluster in ``data_dir`` with the app role, database and demo data."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset and falls back to /tmp: fine here.
        warnings.simplefilter("ignore", UserWarning)
        import pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(data_dir), cleanup_mode="stop")
    admin_dsn = server.get_uri()
    socket_dir = admin_dsn.split("host=", 1)[1].split("&", 1)[0]
    app_dsn = f"postgresql://{APP_ROLE}@/{APP_DATABASE}?host={socket_dir}"
    asyncio.run(_prepare(admin_dsn, app_dsn, demo))
    return Postgres(server, admin_dsn, app_dsn)


async def _prepare(admin_dsn: str, app_dsn: str, demo: bool) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE):
            # Least privilege: the gateway's login is neither superuser nor exempt from RLS.
            await admin.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS")
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", APP_DATABASE):
            await admin.execute(f"CREATE DATABASE {APP_DATABASE} OWNER {APP_ROLE}")
    finally:
        await admin.close()
    if demo:
        conn = await asyncpg.connect(app_dsn)
        try:
            await load_demo(conn)
        finally:
            await conn.close()


@dataclass
class GatewayProcess:
    """A ``querygate serve`` process (for tests and benchmarks that measure it from outside)."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(settings: dict[str, str], log_path: Path) -> GatewayProcess:
    """Run ``querygate serve`` with exactly these QUERYGATE_* settings and wait for /readyz."""
    import sys

    port = settings.get("port") or str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYGATE_")}
    env.update({f"QUERYGATE_{k.upper()}": v for k, v in settings.items()})
    env["QUERYGATE_PORT"] = port
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}")
    try:
        wait_http(f"{gateway.url}/readyz", timeout_s=60)
    except StackError:
        gateway.stop()
        raise StackError(f"gateway did not become ready: {log_path.read_text()[-2000:]}") from None
    return gateway
