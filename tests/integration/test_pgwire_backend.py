"""The wire protocol's own client of PostgreSQL against the real server (pgserver): raw
DataRow bytes as PostgreSQL sends them, the extended protocol, authentication by password
(trust, cleartext, MD5, SCRAM-SHA-256), cancel, limits and the pool.

pgserver's pg_hba.conf trusts every local connection; the password tests put lines for
roles of their own ahead of it (and take them out again), so those roles must give a
password over the same Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from app.pgwire import messages as m
from app.pgwire.backend import (
    BackendConnectError,
    BackendConnection,
    BackendError,
    BackendParams,
    BackendPool,
    PoolClosed,
)
from app.pgwire.messages import ProtocolError

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pässword"
# role → (pg_hba method, password_encryption of its stored password)
PASSWORD_ROLES = {
    "qg_pgwire_scram": ("scram-sha-256", "scram-sha-256"),
    "qg_pgwire_md5": ("md5", "md5"),
    "qg_pgwire_clear": ("password", "scram-sha-256"),
}


@pytest.fixture(scope="module")
def app_params(postgres) -> BackendParams:
    return BackendParams.from_dsn(postgres.app_dsn, connect_timeout_s=5)


@pytest.fixture
async def conn(app_params: BackendParams) -> AsyncIterator[BackendConnection]:
    connection = await BackendConnection.connect(app_params)
    yield connection
    connection.close()
    await connection.wait_closed()


async def until_ready(conn: BackendConnection) -> list[tuple[int, bytes]]:
    """Every message up to and including the next ReadyForQuery, within 10 s."""
    out = []
    async with asyncio.timeout(10):
        while True:
            kind, payload = await conn.read()
            out.append((kind, payload))
            if kind == ord("Z"):
                return out


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5) -> None:
    """Until ``check()`` holds: server state (pg_stat_activity, a reload) or a task's progress."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.01)


def kinds(received: list[tuple[int, bytes]]) -> str:
    return "".join(chr(kind) for kind, _ in received)


def rows(received: list[tuple[int, bytes]]) -> list[list[bytes | None]]:
    return [m.parse_data_row(p) for kind, p in received if kind == ord("D")]


async def scalar(conn: BackendConnection, sql: str) -> str | None:
    (row,) = rows(await conn.simple(sql))
    value = row[0]
    return None if value is None else value.decode()


# --- connecting and the simple protocol ------------------------------------------------------


async def test_connect_as_the_app_role(conn: BackendConnection) -> None:
    assert conn.status == b"I" and conn.pending == 0 and not conn.closed
    assert conn.pid > 0 and conn.authentication == "trust"
    # What the server reports at startup (ParameterStatus), kept up to date.
    assert conn.parameters["session_authorization"] == "querygate"
    assert conn.parameters["client_encoding"] == "UTF8"
    assert conn.parameters["server_version"].startswith("16.")
    assert await scalar(conn, "SELECT pg_backend_pid()") == str(conn.pid)
    await conn.simple("SET application_name = 'changed'")
    assert conn.parameters["application_name"] == "changed"


async def test_simple_query(conn: BackendConnection) -> None:
    received = await conn.simple("SELECT 42 AS answer, NULL::text AS nothing")
    assert kinds(received) == "TDCZ"
    (field_a, field_b) = m.parse_row_description(received[0][1])
    assert (field_a.name, field_a.type_oid, field_a.format) == ("answer", 23, 0)
    assert (field_b.name, field_b.type_oid) == ("nothing", 25)
    assert rows(received) == [[b"42", None]]
    assert m.parse_command_complete(received[2][1]) == "SELECT 1"
    # Several statements, one ReadyForQuery; an empty query has its own answer.
    assert kinds(await conn.simple("SELECT 1; SELECT 2")) == "TDCTDCZ"
    assert kinds(await conn.simple("")) == "IZ"


async def test_an_error_leaves_the_connection_usable(conn: BackendConnection) -> None:
    with pytest.raises(BackendError) as info:
        await conn.simple("SELECT 1/0")
    assert info.value.sqlstate == "22012" and info.value.message == "division by zero"
    assert info.value.fields["S"] == "ERROR"
    assert conn.status == b"I" and conn.pending == 0
    assert await scalar(conn, "SELECT 'still here'") == "still here"
    # In a transaction, the error leaves it failed ('E') until ROLLBACK.
    await conn.simple("BEGIN")
    assert conn.status == b"T"
    with pytest.raises(BackendError):
        await conn.simple("SELECT 1/0")
    assert conn.status == b"E"
    await conn.simple("ROLLBACK")
    assert conn.status == b"I"


async def test_notices_are_handed_back(conn: BackendConnection) -> None:
    received = await conn.simple("DO $$ BEGIN RAISE NOTICE 'hello %', 7; END $$")
    assert kinds(received) == "NCZ"
    notice = m.parse_error_fields(received[0][1])
    assert (notice["V"], notice["C"], notice["M"]) == ("NOTICE", "00000", "hello 7")


# --- the extended protocol -------------------------------------------------------------------


async def test_result_formats_binary_and_text(conn: BackendConnection) -> None:
    conn.send(
        m.parse("", "SELECT 42::int4 AS n", ()), m.bind("", "", (), (), (1,)), m.describe("P", ""),
        m.execute("", 0), m.sync(),
    )
    await conn.flush()
    received = await until_ready(conn)
    assert kinds(received) == "12TDCZ"
    (field,) = m.parse_row_description(received[2][1])
    assert (field.type_oid, field.type_size, field.format) == (23, 4, 1)
    # The DataRow payload as PostgreSQL sent it: one column, 4 bytes, 42 in network order.
    assert received[3][1] == b"\x00\x01" + b"\x00\x00\x00\x04" + b"\x00\x00\x00\x2a"
    assert rows(received) == [[b"\x00\x00\x00\x2a"]]

    conn.send(m.parse("", "SELECT 42::int4", ()), m.bind("", "", (), (), (0,)), m.execute("", 0), m.sync())
    await conn.flush()
    received = await until_ready(conn)
    assert kinds(received) == "12DCZ"
    assert received[2][1] == b"\x00\x01\x00\x00\x00\x02" + b"42"


async def raw_session(params: BackendParams, frames: bytes) -> bytes:
    """What PostgreSQL sends to a bare socket for a trust startup and then ``frames``, to its
    second ReadyForQuery: the reference the relayed bytes are compared with."""
    assert params.unix_socket is not None
    reader, writer = await asyncio.open_unix_connection(params.unix_socket)
    try:
        writer.write(m.startup(params.startup_params()) + frames)
        data, ready = b"", 0
        async with asyncio.timeout(10):
            while ready < 2:
                chunk = await reader.read(65536)
                assert chunk
                data += chunk
                ready = data.count(b"Z\x00\x00\x00\x05")
        return data
    finally:
        writer.close()
        await writer.wait_closed()


def frame(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + (len(payload) + 4).to_bytes(4, "big") + payload


async def test_relayed_messages_are_the_servers_bytes(
    conn: BackendConnection, app_params: BackendParams
) -> None:
    sql = "SELECT g, g * 1.5 AS x, 'é' || g AS t, NULL::int AS z FROM generate_series(1, 3) g"
    frames = b"".join([
        m.parse("", sql, ()), m.bind("", "", (), (), (1, 0, 1, 1)), m.describe("P", ""),
        m.execute("", 0), m.sync(),
    ])
    conn.send(frames)
    await conn.flush()
    received = await until_ready(conn)
    relayed = b"".join(frame(kind, payload) for kind, payload in received)
    # From the extended query's ParseComplete on, byte for byte what a bare socket gets.
    reference = await raw_session(app_params, frames)
    assert kinds(received) == "12TDDDCZ"
    assert reference.endswith(relayed)
    # A DataRow built again from its values is the same message.
    for kind, payload in received:
        if kind == ord("D"):
            assert m.data_row(m.parse_data_row(payload)) == frame(kind, payload)


async def test_read_rows_relays_runs_of_data_rows(
    conn: BackendConnection, app_params: BackendParams
) -> None:
    sql = "SELECT g, repeat('y', g % 50) FROM generate_series(1, 20000) g"
    frames = m.parse("", sql, ()) + m.bind("", "", (), (), (1, 0)) + m.execute("", 0) + m.sync()
    conn.send(frames)
    await conn.flush()
    assert kinds([await conn.read(), await conn.read()]) == "12"
    relayed, runs = b"", 0
    async with asyncio.timeout(10):
        while chunk := await conn.read_rows(max_bytes=64 * 1024):
            assert chunk[0] == ord("D")
            assert len(chunk) < 64 * 1024 + 100
            relayed += chunk
            runs += 1
    assert 1 < runs < 20000  # many rows a call
    rest = await until_ready(conn)
    assert kinds(rest) == "CZ" and conn.pending == 0
    # Byte for byte what a bare socket receives between BindComplete and CommandComplete.
    reference = await raw_session(app_params, frames)
    tail = b"".join(frame(kind, payload) for kind, payload in rest)
    assert reference.endswith(m.parse_complete() + m.bind_complete() + relayed + tail)
    # Not a DataRow next: nothing taken.
    conn.send(m.query("SELECT 1 WHERE false"))
    await conn.flush()
    assert await conn.read_rows() == b""
    assert kinds(await until_ready(conn)) == "TCZ"


async def test_execute_max_rows_suspends_the_portal(conn: BackendConnection) -> None:
    conn.send(m.parse("", "SELECT g FROM generate_series(1, 5) g", ()), m.bind("", "", (), (), (0,)),
              m.execute("", 2), m.flush())
    await conn.flush()
    got = []
    async with asyncio.timeout(10):
        while not got or got[-1][0] != ord("s"):
            got.append(await conn.read())
    assert kinds(got) == "12DDs"
    assert conn.pending == 0
    conn.send(m.execute("", 2), m.execute("", 0), m.sync())
    await conn.flush()
    rest = await until_ready(conn)
    assert kinds(rest) == "DDsDCZ"
    assert rows(got + rest) == [[b"1"], [b"2"], [b"3"], [b"4"], [b"5"]]
    assert m.parse_command_complete(rest[-2][1]) == "SELECT 1"  # the rows of the last Execute


async def test_an_error_then_sync(conn: BackendConnection) -> None:
    # The error at execution (1/0 for g = 0); after it the server skips to the Sync: nothing
    # for the second Bind and Execute.
    conn.send(
        m.parse("", "SELECT 1/g FROM generate_series($1::int4, 1) g", ()), m.bind("", "", (), (b"0",), ()),
        m.execute("", 0),
        m.bind("", "", (), (b"1",), ()), m.execute("", 0), m.sync(),
    )
    await conn.flush()
    received = await until_ready(conn)
    assert kinds(received) == "12EZ"
    assert m.parse_error_fields(received[2][1])["C"] == "22012"
    assert conn.status == b"I" and conn.pending == 0
    # Two Syncs pipelined, the first batch failing: each gets its ReadyForQuery.
    conn.send(m.parse("", "SELEC 1", ()), m.sync(), m.query("SELECT 7"))
    assert conn.pending == 2
    await conn.flush()
    assert kinds(await until_ready(conn)) == "EZ"
    assert rows(await until_ready(conn)) == [[b"7"]]
    assert conn.pending == 0


async def test_named_statements_survive_syncs(conn: BackendConnection) -> None:
    conn.send(m.parse("s1", "SELECT $1::int4 + 1 AS n", (23,)), m.sync())
    await conn.flush()
    assert kinds(await until_ready(conn)) == "1Z"
    conn.send(m.describe("S", "s1"), m.sync())
    await conn.flush()
    described = await until_ready(conn)
    assert kinds(described) == "tTZ"
    assert m.parse_parameter_description(described[0][1]) == (23,)
    for value in (41, 99):
        conn.send(m.bind("", "s1", (1,), (value.to_bytes(4, "big"),), (1,)), m.execute("", 0), m.sync())
        await conn.flush()
        received = await until_ready(conn)
        assert kinds(received) == "2DCZ"
        assert rows(received) == [[(value + 1).to_bytes(4, "big")]]
    conn.send(m.close("S", "s1"), m.sync())
    await conn.flush()
    assert kinds(await until_ready(conn)) == "3Z"
    conn.send(m.bind("", "s1", (), (), ()), m.sync())
    await conn.flush()
    received = await until_ready(conn)
    assert kinds(received) == "EZ"
    assert m.parse_error_fields(received[0][1])["C"] == "26000"  # invalid_sql_statement_name


async def test_server_settings_arrive(postgres) -> None:
    params = BackendParams.from_dsn(
        postgres.app_dsn,
        server_settings={"search_path": '"pg_catalog", "public", "pg_temp"', "application_name": "qg-pgwire",
                         "statement_timeout": "1234", "default_transaction_read_only": "on"},
    )
    conn = await BackendConnection.connect(params)
    try:
        assert await scalar(conn, "SHOW search_path") == '"pg_catalog", "public", "pg_temp"'
        assert await scalar(conn, "SHOW statement_timeout") == "1234ms"
        assert conn.parameters["application_name"] == "qg-pgwire"
        assert conn.parameters["default_transaction_read_only"] == "on"
        with pytest.raises(BackendError) as info:
            await conn.simple("CREATE TABLE qg_pgwire_nope (x int)")
        assert info.value.sqlstate == "25006"
    finally:
        conn.close()
    # asyncpg's rule: a DSN's unknown query parameter is a server setting (here role=).
    owner = await BackendConnection.connect(BackendParams.from_dsn(postgres.owner_dsn))
    try:
        assert await scalar(owner, "SELECT current_user") == "querygate_owner"
        assert await scalar(owner, "SELECT session_user") == "querygate"
    finally:
        owner.close()


# --- authentication --------------------------------------------------------------------------


def _socket_dir(dsn: str) -> str:
    return dsn.split("host=", 1)[1].split("&", 1)[0]


@pytest.fixture(scope="module")
def password_roles(postgres, admin_db) -> Iterator[dict[str, BackendParams]]:
    """Roles that must authenticate by password: pg_hba lines of their own, ahead of trust."""
    hba = Path(admin_db.fetchval("SHOW hba_file"))
    original = hba.read_text()
    for role, (_, encryption) in PASSWORD_ROLES.items():
        admin_db.execute(
            f"DROP ROLE IF EXISTS {role}; SET password_encryption = '{encryption}'; "
            f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'"
        )
    lines = "".join(f"local all {role} {method}\n" for role, (method, _) in PASSWORD_ROLES.items())
    hba.write_text(lines + original)
    try:
        assert admin_db.fetchval("SELECT pg_reload_conf()")
        rules = admin_db.fetch("SELECT user_name, auth_method, error FROM pg_hba_file_rules LIMIT 3")
        assert [(r["user_name"], r["auth_method"], r["error"]) for r in rules] == [
            ([role], method, None) for role, (method, _) in PASSWORD_ROLES.items()
        ]
        socket_dir = _socket_dir(postgres.app_dsn)
        params = {
            role: BackendParams(socket_dir, _port(postgres.app_dsn), user=role, password=PASSWORD,
                                database="appdb", connect_timeout_s=5)
            for role in PASSWORD_ROLES
        }
        asyncio.run(_until_passwords_required(params))
        yield params
    finally:
        hba.write_text(original)
        admin_db.fetchval("SELECT pg_reload_conf()")
        for role in PASSWORD_ROLES:
            with contextlib.suppress(Exception):
                admin_db.execute(f"DROP ROLE IF EXISTS {role}")


def _port(dsn: str) -> int:
    directory = Path(_socket_dir(dsn))
    (socket,) = [p for p in directory.glob(".s.PGSQL.*") if not p.name.endswith(".lock")]
    return int(socket.name.rsplit(".", 1)[1])


async def _until_passwords_required(params: dict[str, BackendParams]) -> None:
    """The postmaster reloads pg_hba.conf on SIGHUP, a moment after pg_reload_conf()."""
    deadline = time.monotonic() + 10
    for param in params.values():
        while True:
            try:
                conn = await BackendConnection.connect(BackendParams(
                    param.host, param.port, user=param.user, database="appdb"))
            except BackendConnectError:
                break
            conn.close()
            assert time.monotonic() < deadline, "pg_hba.conf was not reloaded"
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(("role", "method"), [
    ("qg_pgwire_scram", "scram-sha-256"), ("qg_pgwire_md5", "md5"), ("qg_pgwire_clear", "password"),
])
async def test_password_authentication(
    password_roles: dict[str, BackendParams], role: str, method: str
) -> None:
    params = password_roles[role]
    conn = await BackendConnection.connect(params)
    try:
        assert conn.authentication == method
        assert await scalar(conn, "SELECT current_user") == role
    finally:
        conn.close()
    wrong = BackendParams(params.host, params.port, user=role, password="wrong", database="appdb")
    with pytest.raises(BackendError) as info:
        await BackendConnection.connect(wrong)
    assert info.value.sqlstate == "28P01" and info.value.fields["S"] == "FATAL"
    with pytest.raises(BackendConnectError, match="asks for a password"):
        await BackendConnection.connect(BackendParams(params.host, params.port, user=role, database="appdb"))


async def test_password_from_a_dsn(password_roles: dict[str, BackendParams], postgres) -> None:
    # A password with characters a URI must escape, percent-encoded as asyncpg reads it.
    quoted = "s3cret-p%C3%A4ssword"
    dsn = f"postgresql://qg_pgwire_scram:{quoted}@/appdb?host={_socket_dir(postgres.app_dsn)}"
    params = BackendParams.from_dsn(dsn)
    assert params.password == PASSWORD
    conn = await BackendConnection.connect(params)
    try:
        assert conn.authentication == "scram-sha-256"
    finally:
        conn.close()


# --- cancel, limits, ending ------------------------------------------------------------------


async def test_cancel_ends_a_running_query(conn: BackendConnection, app_params: BackendParams) -> None:
    running = asyncio.ensure_future(conn.simple("SELECT pg_sleep(10)"))
    watcher = await BackendConnection.connect(app_params)
    try:
        async def active() -> bool:
            state = f"SELECT state FROM pg_stat_activity WHERE pid = {conn.pid}"
            return await scalar(watcher, state) == "active"

        await eventually(active)
    finally:
        watcher.close()
    started = time.monotonic()
    await conn.cancel()
    with pytest.raises(BackendError) as info:
        async with asyncio.timeout(5):
            await running
    assert info.value.sqlstate == "57014"
    assert time.monotonic() - started < 2
    assert await scalar(conn, "SELECT 1") == "1"


async def test_a_read_timeout_before_a_message_keeps_the_connection(conn: BackendConnection) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await conn.read()
    assert not conn.closed
    assert await scalar(conn, "SELECT 2") == "2"


async def test_a_read_interrupted_inside_a_message_keeps_the_connection(conn: BackendConnection) -> None:
    # A DataRow of 64 MiB: the read is cut while its body is still arriving. Nothing is
    # taken from the buffer until a message is whole, so reading on gets all of it.
    size = 64 * 1024 * 1024
    conn.send(m.query(f"SELECT repeat('x', {size})"))
    await conn.flush()
    assert (await conn.read())[0] == ord("T")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.001):
            await conn.read()
    assert not conn.closed
    kind, payload = await conn.read()
    assert kind == ord("D") and len(payload) == 2 + 4 + size
    assert kinds(await until_ready(conn)) == "CZ"
    assert await scalar(conn, "SELECT 3") == "3"


async def test_a_message_over_the_limit_closes_the_connection(app_params: BackendParams) -> None:
    conn = await BackendConnection.connect(app_params, max_message_len=4096)
    conn.send(m.query("SELECT repeat('x', 5000)"))
    await conn.flush()
    assert (await conn.read())[0] == ord("T")
    with pytest.raises(ProtocolError, match=r"outside 4\.\.4096"):
        await conn.read()
    assert conn.closed
    with pytest.raises(ConnectionResetError):
        conn.send(m.sync())


async def test_terminate_wakes_a_waiting_read(conn: BackendConnection) -> None:
    conn.send(m.query("SELECT pg_sleep(5)"))
    await conn.flush()
    reading = asyncio.ensure_future(conn.read())
    await asyncio.sleep(0.1)
    conn.terminate()
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(2):
            await reading


async def test_the_server_ending_the_session(conn: BackendConnection, postgres, app_params) -> None:
    admin = await BackendConnection.connect(BackendParams.from_dsn(postgres.admin_dsn))
    try:
        await admin.simple(f"SELECT pg_terminate_backend({conn.pid})")
    finally:
        admin.close()
    await eventually(lambda: conn.closed)
    # The FATAL error is still there to read, then the end.
    kind, payload = await conn.read()
    assert kind == ord("E") and m.parse_error_fields(payload)["C"] == "57P01"
    with pytest.raises(ConnectionResetError):
        await conn.read()


async def test_connect_failures(app_params: BackendParams, tmp_path: Path) -> None:
    with pytest.raises(BackendError) as info:
        await BackendConnection.connect(BackendParams(app_params.host, app_params.port, user="querygate",
                                                      database="qg_no_such_db"))
    assert info.value.sqlstate == "3D000"
    with pytest.raises(BackendError) as info:
        await BackendConnection.connect(BackendParams(app_params.host, app_params.port, user="qg_nobody"))
    assert info.value.sqlstate == "28000"
    with pytest.raises(BackendError) as info:
        await BackendConnection.connect(BackendParams(
            app_params.host, app_params.port, user="querygate", database="appdb",
            server_settings={"no_such_setting": "1"}))
    assert info.value.sqlstate == "42704"
    with pytest.raises(FileNotFoundError):
        await BackendConnection.connect(BackendParams(str(tmp_path), user="querygate"))


async def test_connect_timeout(tmp_path: Path) -> None:
    # A listener that accepts and never answers: the startup is cut at connect_timeout_s.
    path = tmp_path / ".s.PGSQL.5432"
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_unix_server(lambda r, w: accepted.append(w), path=str(path))
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"longer than 0\.3s"):
            await BackendConnection.connect(BackendParams(str(tmp_path), user="u", connect_timeout_s=0.3))
        assert time.monotonic() - started < 2
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def tcp_to_unix(socket_path: str) -> AsyncIterator[int]:
    """A TCP port on loopback whose connections are piped to the server's Unix socket."""
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_unix_connection(socket_path)
        for task in (asyncio.ensure_future(pipe(client_r, server_w)),
                     asyncio.ensure_future(pipe(server_r, client_w))):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_sslmode_over_tcp(app_params: BackendParams) -> None:
    # pgserver has no TLS: it answers an SSLRequest with 'N' (asked over TCP, here piped to
    # its socket). prefer goes on in the clear; require refuses to.
    assert app_params.unix_socket is not None
    async with tcp_to_unix(app_params.unix_socket) as port:
        base = BackendParams("127.0.0.1", port, user="querygate", database="appdb", connect_timeout_s=5)
        assert base.sslmode is None  # prefer, over TCP
        conn = await BackendConnection.connect(base)
        try:
            assert await scalar(conn, "SELECT 'clear'") == "clear"
            # cancel goes over TCP too.
            running = asyncio.ensure_future(conn.simple("SELECT pg_sleep(10)"))
            await asyncio.sleep(0.3)
            await conn.cancel()
            with pytest.raises(BackendError, match="57014"):
                async with asyncio.timeout(5):
                    await running
        finally:
            conn.close()
            await conn.wait_closed()
        for mode in ("require", "verify-ca", "verify-full"):
            with pytest.raises(BackendConnectError, match=f"refused TLS and sslmode is {mode}"):
                await BackendConnection.connect(BackendParams(
                    "127.0.0.1", port, user="querygate", sslmode=mode, connect_timeout_s=5))


# --- the pool --------------------------------------------------------------------------------


@pytest.fixture
async def pool(app_params: BackendParams) -> AsyncIterator[BackendPool]:
    backend_pool = BackendPool(app_params, max_size=2)
    yield backend_pool
    await backend_pool.close(timeout_s=2)


async def test_pool_max_size_and_acquire_timeout(pool: BackendPool) -> None:
    first = await pool.checkout(1)
    second = await pool.checkout(1)
    assert (pool.size, pool.idle) == (2, 0) and first.pid != second.pid
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no PostgreSQL connection came free within 0\.2s"):
        async with pool.acquire(timeout=0.2):
            pass
    assert 0.15 < time.monotonic() - started < 1
    assert pool.size == 2 and pool.waiting == 0
    await pool.release(first)
    await pool.release(second)
    assert (pool.size, pool.idle) == (2, 2)
    async with pool.acquire(1) as again:
        assert again.pid in (first.pid, second.pid)


async def test_pool_serves_waiters_in_order(app_params: BackendParams) -> None:
    pool = BackendPool(app_params, max_size=1)
    try:
        held = await pool.checkout(1)
        order: list[int] = []

        async def waiter(i: int) -> None:
            async with pool.acquire(5) as conn:
                order.append(i)
                await conn.simple("SELECT 1")

        tasks = []
        for i in range(4):
            tasks.append(asyncio.ensure_future(waiter(i)))
            await eventually(lambda n=i + 1: pool.waiting == n)
        await pool.release(held)
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3]
        assert (pool.size, pool.idle) == (1, 1)
    finally:
        await pool.close()


async def test_pool_replaces_a_terminated_connection(pool: BackendPool) -> None:
    async with pool.acquire(1) as conn:
        first = conn.pid
        conn.terminate()  # a deadline fired
    assert (pool.size, pool.idle) == (0, 0)
    async with pool.acquire(1) as conn:
        assert conn.pid != first
        assert await scalar(conn, "SELECT 1") == "1"
    assert (pool.size, pool.idle) == (1, 1)


async def test_pool_drops_an_idle_connection_the_server_ended(pool: BackendPool, postgres) -> None:
    async with pool.acquire(1) as conn:
        first = conn.pid
    admin = await BackendConnection.connect(BackendParams.from_dsn(postgres.admin_dsn))
    try:
        await admin.simple(f"SELECT pg_terminate_backend({first})")
    finally:
        admin.close()
    await asyncio.sleep(0.2)
    async with pool.acquire(1) as conn:
        assert conn.pid != first
        assert await scalar(conn, "SELECT 1") == "1"


async def test_a_waiter_gets_the_place_of_a_dropped_connection(app_params: BackendParams) -> None:
    pool = BackendPool(app_params, max_size=1)
    try:
        held = await pool.checkout(1)
        waiting = asyncio.ensure_future(pool.checkout(5))
        await eventually(lambda: pool.waiting == 1)
        held.terminate()
        await pool.release(held)
        conn = await waiting
        assert conn.pid != held.pid and pool.size == 1
        await pool.release(conn)
    finally:
        await pool.close()


async def _one(conn: BackendConnection, sql: str) -> bytes | None:
    """The first column of the first row of ``sql``, as the server's text."""
    received = await conn.simple(sql)
    return next(m.parse_data_row(payload)[0] for kind, payload in received if kind == ord("D"))


async def test_pool_reset_keeps_prepared_statements(app_params: BackendParams) -> None:
    pool = BackendPool(app_params, max_size=1)
    try:
        async with pool.acquire(1) as conn:
            pid = conn.pid
            conn.send(m.parse("kept", "SELECT current_setting('search_path')", ()), m.sync())
            await conn.flush()
            await until_ready(conn)
            await conn.simple("SET search_path = pg_catalog; DECLARE c CURSOR WITH HOLD FOR SELECT 1")
            await conn.simple("SELECT pg_advisory_lock(4242); LISTEN querygate_test")
            await conn.simple("BEGIN")
        async with pool.acquire(1) as conn:
            assert conn.pid == pid and conn.status == b"I"
            conn.send(m.bind("", "kept", (), (), ()), m.execute("", 0), m.sync())
            await conn.flush()
            received = await until_ready(conn)
            assert kinds(received) == "2DCZ"
            assert rows(received) == [[b'"$user", public']]  # RESET ALL restored it
            with pytest.raises(BackendError) as info:
                await conn.simple("FETCH c")  # CLOSE ALL closed it
            assert info.value.sqlstate == "34000"
            # The advisory lock and the LISTEN went with the reset.
            assert await _one(conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                              "AND pid = pg_backend_pid()") == b"0"
            assert await _one(conn, "SELECT count(*) FROM pg_listening_channels()") == b"0"
    finally:
        await pool.close()


async def test_pool_drops_what_it_cannot_reset(app_params: BackendParams) -> None:
    pool = BackendPool(app_params, max_size=1)
    try:
        # Answers still owed (a client went away mid-result): not read, dropped.
        async with pool.acquire(1) as conn:
            conn.send(m.query("SELECT 1"))
            await conn.flush()
            assert conn.pending == 1
        assert pool.size == 0
        # The body cancelled (a deadline): no reset in a cancelled task, dropped.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2), pool.acquire(1) as conn:
                await conn.simple("SELECT pg_sleep(5)")
        assert pool.size == 0
        # A reset that fails: dropped.

        async def failing(conn: BackendConnection) -> None:
            await conn.simple("SELECT 1/0")

        failing_pool = BackendPool(app_params, max_size=1, reset=failing)
        try:
            async with failing_pool.acquire(1):
                pass
            assert failing_pool.size == 0
        finally:
            await failing_pool.close()
        # No reset at all: only an idle session goes back.
        plain = BackendPool(app_params, max_size=1, reset=None)
        try:
            async with plain.acquire(1) as conn:
                await conn.simple("SELECT 1")
            assert plain.idle == 1
            async with plain.acquire(1) as conn:
                await conn.simple("BEGIN")
            assert plain.size == 0
        finally:
            await plain.close()
    finally:
        await pool.close()


async def test_pool_open_and_close(app_params: BackendParams) -> None:
    pool = BackendPool(app_params, min_size=2, max_size=3)
    await pool.open()
    assert (pool.size, pool.idle) == (2, 2)
    held = await pool.checkout(1)
    waiter_pool = BackendPool(app_params, max_size=1)
    blocker = await waiter_pool.checkout(1)
    waiting = asyncio.ensure_future(waiter_pool.checkout(5))
    await eventually(lambda: waiter_pool.waiting == 1)
    await waiter_pool.close(timeout_s=0.1)  # the held one is terminated after 0.1 s
    with pytest.raises(PoolClosed):
        await waiting
    assert blocker.closed
    await waiter_pool.release(blocker)  # harmless after close

    closing = asyncio.ensure_future(pool.close(timeout_s=5))
    await asyncio.sleep(0.05)
    assert not closing.done()  # waits for the connection in use
    await pool.release(held)
    async with asyncio.timeout(2):
        await closing
    assert held.closed and pool.size == 0
    with pytest.raises(PoolClosed):
        await pool.checkout(1)
