"""The gateway's own client of PostgreSQL: every backend message handed back as raw bytes.

asyncpg decodes rows and cannot give their bytes back, and the front end (issue 17) must
relay a DataRow verbatim, in the format its client asked for, wherever no mask applies. So
this client does only what the relay needs: it connects and authenticates (trust,
cleartext, MD5, SCRAM-SHA-256; TLS per ``sslmode``), writes whatever frontend messages it is
given (``send``, pipelined, ``flush`` to drain), and reads one backend message at a time
(``read``) as ``(type byte, payload)``, keeping track of what the session needs to know:
``parameters`` (every ParameterStatus), ``pid``/``secret`` (for ``cancel``), ``status``
(the last ReadyForQuery) and ``pending`` (the ReadyForQuery messages still to come, one per
Sync or Query sent). ``BackendPool`` keeps a few connections per ``BackendParams``.

Relaying: ``read_rows`` hands over the DataRow messages that come next as one bytes object,
framed exactly as the server sent them, for the front end to write to its client unchanged
(about 3x cheaper per row than ``read``, and no object per row); ``read`` and
``messages.parse_data_row`` are for the rows a mask must rewrite.

Bounds: connecting (socket, TLS, authentication, up to the first ReadyForQuery) is bounded by
``connect_timeout_s``; ``cancel`` by the same; a message longer than ``max_message_len``
(1 GiB by default, PostgreSQL's own limit) is a ProtocolError that closes the connection.
``read``, ``read_rows`` and ``flush`` are bounded by their caller, who wraps them in
``asyncio.timeout`` (or terminates the connection from a timer, as the executor does, which
wakes every waiting call). A message is taken from the socket's buffer only once it is
whole, so a read interrupted at any point leaves the connection in step and usable; the
answers it was waiting for are still owed (``pending``), and a pool drops such a connection.

Errors::

    BackendError            an ErrorResponse from PostgreSQL (``fields``, ``.sqlstate``,
                            ``.message``); raised by ``connect`` and ``simple`` only: ``read``
                            hands an ErrorResponse back like any other message
    BackendConnectError     (a ConnectionError) this client gave up connecting: the server
                            asks for a password and there is none, or for a method it does
                            not speak; TLS required but refused; a SCRAM exchange that does
                            not verify (a server that does not know the password)
    ProtocolError           (app.pgwire.messages) the server sent something malformed, or
                            longer than max_message_len; the connection is closed
    ConnectionResetError    the server closed the connection, or it was closed here
    OSError                 the socket could not be opened (no such socket, refused)
    TimeoutError            connecting took longer than connect_timeout_s; no pool
                            connection came free within acquire's timeout
    PoolClosed              (a ConnectionError) acquire on a closed pool
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import hashlib
import logging
import os
import re
import ssl
import struct
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Final

import scramp

from app.pgwire import messages
from app.pgwire.messages import MAX_MESSAGE_LEN, ProtocolError

log = logging.getLogger("querygate.pgwire")

SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# Where asyncpg (like libpq) looks for a local server when a DSN names no host.
DEFAULT_SOCKET_DIRS: Final = ("/run/postgresql", "/var/run/postgresql", "/tmp", "/private/tmp")  # noqa: S108
# Query parameters of a DSN that asyncpg understands and this client does not: refused, not
# ignored, since each changes where or how securely the connection goes.
_UNSUPPORTED_DSN_OPTIONS: Final = frozenset({
    "passfile", "service", "servicefile", "sslcrl", "sslpassword", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "sslnegotiation", "target_session_attrs", "krbsrvname", "gsslib",
})
# Reading pauses while this much is buffered and unread (unless a longer message is awaited).
READ_HIGH_WATER: Final = 256 * 1024

_U32 = struct.Struct("!I")
_Z, _E, _S, _A, _N, _D = (ord(c) for c in "ZESAND")
_COUNTED = (ord("S"), ord("Q"))  # each is answered by exactly one ReadyForQuery


class BackendError(Exception):
    """An ErrorResponse from PostgreSQL, with all its fields (S, V, C, M, D, H, P, …)."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.fields = dict(fields)
        super().__init__(f"{self.fields.get('S', 'ERROR')}: {self.message} ({self.sqlstate})")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "XX000")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", "ERROR"))


class BackendConnectError(ConnectionError):
    """This client would not, or could not, complete the connection (not the server's error)."""


class PoolClosed(ConnectionError):
    """The pool was closed."""


# --- where to connect ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendParams:
    """Where and as whom to connect; ``server_settings`` go in the startup packet.

    ``host`` is a hostname, or (a leading "/") a Unix socket directory, whose socket is
    ``<host>/.s.PGSQL.<port>``. ``database`` defaults to the user's name, as in PostgreSQL.
    ``sslmode`` follows libpq's (None: ``prefer`` over TCP, as asyncpg; never TLS on a Unix
    socket, where libpq ignores it too). ``client_encoding`` is UTF8 unless the settings
    say otherwise.
    """

    host: str
    port: int = 5432
    _: KW_ONLY
    user: str
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    server_settings: Mapping[str, str] = field(default_factory=dict, hash=False)
    connect_timeout_s: float = 10.0
    sslmode: str | None = None
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None

    def __post_init__(self) -> None:
        settings = dict(self.server_settings)
        for name in ("user", "database"):
            if name in settings:
                raise ValueError(f"{name!r} is a field of BackendParams, not a server setting")
        object.__setattr__(self, "server_settings", MappingProxyType(settings))
        if self.sslmode is not None and self.sslmode not in SSL_MODES:
            raise ValueError(f"sslmode must be one of {', '.join(SSL_MODES)}, not {self.sslmode!r}")
        if not self.host:
            raise ValueError("host is required")

    @property
    def unix_socket(self) -> str | None:
        """The socket's path, for a host that is a directory."""
        if not self.host.startswith("/"):
            return None
        if ".s.PGSQL." in os.path.basename(self.host):
            return self.host
        return os.path.join(self.host, f".s.PGSQL.{self.port}")

    @property
    def dbname(self) -> str:
        return self.database or self.user

    def startup_params(self) -> dict[str, str]:
        """The StartupMessage's parameters."""
        return {
            "user": self.user,
            "database": self.dbname,
            "client_encoding": "UTF8",
            **self.server_settings,
        }

    @classmethod
    def from_dsn(cls, dsn: str, **overrides: Any) -> BackendParams:
        """Parameters from a ``postgresql://`` URI, read as asyncpg reads it.

        The URI's user, password, host, port and database, then its query: ``host`` (a
        socket directory), ``port``, ``user``, ``password``, ``dbname``/``database``,
        ``sslmode`` and the ``ssl*`` files; every other query parameter is a server setting
        (asyncpg's rule: ``?role=x&search_path=y`` sets both at startup). What the URI lacks
        comes from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE and PGSSLMODE, then the
        defaults: the first of asyncpg's socket directories that has the server's socket,
        else localhost; port 5432; the OS user. ``overrides`` are fields of BackendParams
        and win (as asyncpg's keyword arguments do); their ``server_settings`` are merged over
        the URI's. One host only; a passfile, a service file and GSSAPI are not read. As in
        asyncpg, ``?port=`` counts only where the URI's authority names no host.
        """
        parsed = urllib.parse.urlparse(dsn)
        if parsed.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"invalid DSN: the scheme must be postgresql or postgres, not {parsed.scheme!r}")
        # asyncpg splits at the first "@" (a password's own "@" must be percent-encoded).
        auth, _, hostspec = parsed.netloc.partition("@") if "@" in parsed.netloc else ("", "", parsed.netloc)
        user_part, _, password_part = auth.partition(":")

        host: str | None = None
        port: int | None = None
        if hostspec:
            host, port = _parse_host(hostspec, unquote=True)
            # asyncpg fixes the port with the URI's host (PGPORT or 5432 if it names none),
            # so a query's ?port= is then ignored, unlike libpq.
            if port is None:
                port = _port(os.environ["PGPORT"]) if os.environ.get("PGPORT") else 5432
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        database: str | None = urllib.parse.unquote(path)
        user = urllib.parse.unquote(user_part) or None
        password = urllib.parse.unquote(password_part) or None

        query: dict[str, str] = {}
        if parsed.query:
            for key, values in urllib.parse.parse_qs(parsed.query, strict_parsing=True).items():
                query[key] = values[-1]
        options: dict[str, Any] = {}
        if "port" in query:
            value = query.pop("port")
            if port is None and value:
                port = _port(value)
        if "host" in query:
            value = query.pop("host")
            if host is None and value:
                host, query_port = _parse_host(value)
                port = port if port is not None else query_port
        for key in ("dbname", "database"):
            if key in query:
                value = query.pop(key)
                database = database or value
        if "user" in query:
            value = query.pop("user")
            user = user or value or None
        if "password" in query:
            value = query.pop("password")
            password = password or value or None
        for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
            if key in query:
                options[key] = query.pop(key)
        unsupported = sorted(_UNSUPPORTED_DSN_OPTIONS & query.keys())
        if unsupported:
            raise ValueError(f"DSN options not supported by the backend client: {', '.join(unsupported)}")

        env = os.environ
        if host is None and env.get("PGHOST"):
            host, env_port = _parse_host(env["PGHOST"])
            port = port if port is not None else env_port
        if port is None:
            port = _port(env["PGPORT"]) if env.get("PGPORT") else 5432
        if host is None:
            host = next(
                (d for d in DEFAULT_SOCKET_DIRS if os.path.exists(os.path.join(d, f".s.PGSQL.{port}"))),
                "localhost",
            )
        user = user or env.get("PGUSER") or getpass.getuser()
        password = password or env.get("PGPASSWORD") or None
        database = database or env.get("PGDATABASE") or None
        if "sslmode" not in options and env.get("PGSSLMODE"):
            options["sslmode"] = env["PGSSLMODE"]

        settings = {**query, **(overrides.pop("server_settings", None) or {})}
        fields: dict[str, Any] = {
            "host": host, "port": port, "user": user, "password": password,
            "database": database, "server_settings": settings, **options,
        }
        fields.update(overrides)
        return cls(**fields)


def _port(text: str) -> int:
    if "," in text:
        raise ValueError("one host and port only")
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}")
    return port


def _parse_host(spec: str, unquote: bool = False) -> tuple[str, int | None]:
    """One host of a DSN: a socket directory, ``[v6]:port`` or ``name:port`` (asyncpg's rules)."""
    if "," in spec:
        raise ValueError("one host only: the backend client does not try several")
    if spec.startswith("/"):
        address, port_text = spec, ""
    elif spec.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\](?::([0-9]+))?", spec)
        if match is None:
            raise ValueError(f"invalid IPv6 address in the DSN: {spec!r}")
        address, port_text = match.group(1), match.group(2) or ""
    else:
        address, _, port_text = spec.partition(":")
    if unquote:
        address = urllib.parse.unquote(address)
        port_text = urllib.parse.unquote(port_text)
    return address, (_port(port_text) if port_text else None)


@functools.lru_cache(maxsize=16)
def _ssl_context(mode: str, rootcert: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    if mode in ("verify-ca", "verify-full") or (mode == "require" and rootcert):
        # libpq: "require" with a root certificate verifies the chain, as verify-ca.
        context = ssl.create_default_context(cafile=rootcert)
        context.check_hostname = mode == "verify-full"
    else:
        # allow, prefer, require: encrypted, not authenticated (libpq's meaning of the modes).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key)
    return context


class _Wire(asyncio.Protocol):
    """The socket: what has arrived (``buffer``), the end of the connection, flow control.

    A message is taken from the buffer only once it is whole, so a read cancelled at any
    point (a caller's deadline) leaves the stream in step. Reading pauses while more than
    READ_HIGH_WATER bytes wait, unless a longer message is being awaited (``want``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.want = 0
        self.ended = False  # EOF or connection lost: nothing more will arrive
        self.lost: asyncio.Future[None] = loop.create_future()
        self._reading_paused = False
        self._writing_paused = False
        self._data: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()
        if not self._reading_paused and len(self.buffer) > max(READ_HIGH_WATER, self.want):
            assert self.transport is not None
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._wake()
        if not self.lost.done():
            self.lost.set_result(None)
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        waiter = self._data
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_for(self, size: int) -> None:
        """Until ``size`` bytes are buffered; ConnectionResetError if they never will be."""
        self.want = size
        try:
            self.consumed()
            while len(self.buffer) < size:
                if self.ended:
                    raise ConnectionResetError("PostgreSQL closed the connection")
                self._data = self.loop.create_future()
                try:
                    await self._data
                finally:
                    self._data = None
        finally:
            self.want = 0

    def consumed(self) -> None:
        """The reader took from the buffer: read on if it has room again."""
        if self._reading_paused and len(self.buffer) <= max(READ_HIGH_WATER, self.want) and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()

    async def drain(self) -> None:
        if self.ended:
            raise ConnectionResetError("the connection is closed")
        if self._writing_paused:
            if self._drained is None:
                self._drained = self.loop.create_future()
            await asyncio.shield(self._drained)
            if self.ended:
                raise ConnectionResetError("the connection is closed")


async def _open_wire(params: BackendParams) -> _Wire:
    loop = asyncio.get_running_loop()
    wire = _Wire(loop)
    path = params.unix_socket
    if path is not None:
        await loop.create_unix_connection(lambda: wire, path)
    else:
        await loop.create_connection(lambda: wire, params.host, params.port)
    return wire


async def _negotiate_tls(params: BackendParams, wire: _Wire) -> None:
    mode = params.sslmode or "prefer"
    if params.unix_socket is not None or mode == "disable":
        return
    assert wire.transport is not None
    wire.transport.write(messages.ssl_request())
    await wire.wait_for(1)
    answer = bytes(wire.buffer[:1])
    del wire.buffer[:1]
    if answer == messages.ENCRYPTION_ACCEPTED:
        if wire.buffer:
            # Bytes in the clear after 'S' could be a man in the middle's (CVE-2021-23222).
            raise ProtocolError("the server sent unencrypted data after accepting TLS")
        context = _ssl_context(mode, params.sslrootcert, params.sslcert, params.sslkey)
        transport = await wire.loop.start_tls(wire.transport, wire, context, server_hostname=params.host)
        assert isinstance(transport, asyncio.Transport)
        wire.transport = transport
        return
    if answer != messages.ENCRYPTION_REFUSED:
        # An ErrorResponse ('E') from a server that does not know the request, or worse.
        raise ProtocolError(f"unexpected answer {answer!r} to SSLRequest")
    if mode in ("require", "verify-ca", "verify-full"):
        raise BackendConnectError(f"the server refused TLS and sslmode is {mode}")


# --- one connection --------------------------------------------------------------------------


def _counted(message: bytes) -> int:
    """How many Sync and Query messages a run of whole frontend messages holds."""
    count, pos, size = 0, 0, len(message)
    unpack = _U32.unpack_from
    while pos + 5 <= size:
        if message[pos] in _COUNTED:
            count += 1
        pos += 1 + unpack(message, pos + 1)[0]
    return count


class BackendConnection:
    """One session with PostgreSQL, read and written a message at a time."""

    def __init__(self, params: BackendParams, wire: _Wire, max_message_len: int = MAX_MESSAGE_LEN) -> None:
        self.params = params
        self.max_message_len = max_message_len
        self.parameters: dict[str, str] = {}
        self.pid = 0
        self.secret = 0
        # The last ReadyForQuery's status: b'I' idle, b'T' in a transaction, b'E' failed one.
        self.status = b""
        # ReadyForQuery messages still to come: the connection is quiet at 0.
        self.pending = 0
        # A cancel was asked for what it runs: it never goes back to a pool, where the
        # cancel (it takes a connection of its own) could reach another session's statement.
        self.cancelled = False
        # How the server authenticated us: trust, password, md5 or scram-sha-256.
        self.authentication = "trust"
        self._wire = wire
        assert wire.transport is not None
        self._transport = wire.transport
        self._closed = False
        self._scram: scramp.ScramClient | None = None
        self._scram_verified = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"status={self.status!r} pending={self.pending}"
        return f"<BackendConnection pid={self.pid} {state}>"

    @classmethod
    async def connect(
        cls, params: BackendParams, *, max_message_len: int = MAX_MESSAGE_LEN
    ) -> BackendConnection:
        """Connect, authenticate and wait for the first ReadyForQuery, all within connect_timeout_s."""
        try:
            async with asyncio.timeout(params.connect_timeout_s):
                wire = await _open_wire(params)
                conn = cls(params, wire, max_message_len)
                try:
                    await _negotiate_tls(params, wire)
                    conn._transport = wire.transport or conn._transport
                    await conn._start()
                except BaseException:
                    conn.terminate()
                    raise
        except TimeoutError:
            raise TimeoutError(
                f"connecting to PostgreSQL took longer than {params.connect_timeout_s}s"
            ) from None
        return conn

    async def _start(self) -> None:
        self._transport.write(messages.startup(self.params.startup_params()))
        while True:
            kind, payload = await self._read_raw()
            if kind == ord("R"):
                code, data = messages.parse_authentication(payload)
                if code == 0:
                    if self._scram is not None and not self._scram_verified:
                        # AuthenticationOk without SASLFinal: the server never proved it
                        # knows the password (libpq's require_auth exists for this).
                        raise BackendConnectError("the server ended SCRAM-SHA-256 before proving itself")
                    continue
                answer = self._authenticate(code, data)
                if answer is not None:
                    self.send(answer)
                    await self.flush()
            elif kind == _E:
                raise BackendError(messages.parse_error_fields(payload))
            elif kind == _S:
                name, value = messages.parse_parameter_status(payload)
                self.parameters[name] = value
            elif kind == ord("K"):
                self.pid, self.secret = messages.parse_backend_key_data(payload)
            elif kind == _Z:
                self.status = messages.parse_ready_for_query(payload)
                return
            elif kind not in (_N, ord("v")):
                # A notice, or NegotiateProtocolVersion about a "_pq_." setting, is not fatal.
                raise ProtocolError(f"unexpected message {chr(kind)!r} while connecting")

    def _password(self) -> str:
        if self.params.password is None:
            raise BackendConnectError("PostgreSQL asks for a password and none was given")
        return self.params.password

    def _authenticate(self, code: int, data: bytes) -> bytes | None:
        """The answer to an authentication request: 3 cleartext, 5 MD5, 10, 11, 12 SCRAM."""
        if code == 3:
            self.authentication = "password"
            return messages.password(self._password())
        if code == 5:
            self.authentication = "md5"
            if len(data) != 4:
                raise ProtocolError("malformed AuthenticationMD5Password message")
            # PostgreSQL's md5 scheme; the hash is the protocol's, not a choice made here.
            inner = hashlib.md5((self._password() + self.params.user).encode(), usedforsecurity=False)
            outer = hashlib.md5(inner.hexdigest().encode() + data, usedforsecurity=False)
            return messages.password("md5" + outer.hexdigest())
        try:
            if code == 10 and self._scram is None:
                mechanisms = messages.parse_sasl_mechanisms(data)
                if "SCRAM-SHA-256" not in mechanisms:
                    raise BackendConnectError(f"no supported SASL mechanism among {mechanisms}")
                self.authentication = "scram-sha-256"
                # PostgreSQL ignores the exchange's user name: the startup packet's counts.
                self._scram = scramp.ScramClient(["SCRAM-SHA-256"], self.params.user, self._password())
                first = self._scram.get_client_first().encode()
                return messages.sasl_initial_response("SCRAM-SHA-256", first)
            if code == 11 and self._scram is not None:
                self._scram.set_server_first(data.decode())
                return messages.sasl_response(self._scram.get_client_final().encode())
            if code == 12 and self._scram is not None:
                self._scram.set_server_final(data.decode())
                self._scram_verified = True
                return None
        except (scramp.ScramException, UnicodeDecodeError) as exc:
            # A server signature that does not verify: it does not know the password.
            raise BackendConnectError(f"SCRAM-SHA-256 failed: {exc}") from exc
        if code in (10, 11, 12):
            raise ProtocolError(f"SASL message {code} out of order")
        names = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 9: "SSPI"}
        raise BackendConnectError(f"authentication method {names.get(code, code)} is not supported")

    # -- writing

    def send(self, *frames: bytes) -> None:
        """Write whole frontend messages, without waiting (``flush`` drains)."""
        if self._closed:
            raise ConnectionResetError("the connection is closed")
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        self.pending += _counted(data)
        self._transport.write(data)

    async def flush(self) -> None:
        """Wait until the transport's buffer has drained (bounded by the caller)."""
        await self._wire.drain()

    # -- reading

    async def _read_raw(self) -> tuple[int, bytes]:
        if self._closed:
            raise ConnectionResetError("the connection is closed")
        buffer = self._wire.buffer
        if len(buffer) < 5:
            await self._wait_for(5)
        (length,) = _U32.unpack_from(buffer, 1)
        limit = self.max_message_len
        if length < 4 or length > limit:
            shown = chr(buffer[0])
            self.terminate()
            raise ProtocolError(f"backend message {shown!r} of {length} bytes is outside 4..{limit}")
        end = length + 1
        if len(buffer) < end:
            await self._wait_for(end)
        kind = buffer[0]
        with memoryview(buffer) as view:
            payload = bytes(view[5:end])
        del buffer[:end]
        self._wire.consumed()
        return kind, payload

    async def _wait_for(self, size: int) -> None:
        # Cancelled here, nothing has been taken from the buffer: the connection stays usable.
        try:
            await self._wire.wait_for(size)
        except ConnectionResetError:
            self.terminate()
            raise

    def _note(self, kind: int, payload: bytes) -> None:
        if kind == _Z:
            self.status = messages.parse_ready_for_query(payload)
            if self.pending:
                self.pending -= 1
        elif kind == _S:
            name, value = messages.parse_parameter_status(payload)
            self.parameters[name] = value

    async def read(self) -> tuple[int, bytes]:
        """The next backend message, raw; ParameterStatus and ReadyForQuery update the state.

        NoticeResponse and ParameterStatus are handed back (the front end relays them);
        NotificationResponse is skipped (the gateway does not LISTEN).
        """
        while True:
            kind, payload = await self._read_raw()
            if kind == _Z or kind == _S:
                self._note(kind, payload)
            elif kind == _A:
                continue
            return kind, payload

    async def read_rows(self, max_bytes: int = READ_HIGH_WATER) -> bytes:
        """The DataRow messages that come next, whole and framed exactly as the server sent them.

        The relay's fast path: bytes to write to the client unchanged, without a message
        object per row. At least one row, and whole rows up to about ``max_bytes`` of what is
        already buffered; b"" when the next message is not a DataRow (read it with ``read``).
        """
        if self._closed:
            raise ConnectionResetError("the connection is closed")
        buffer = self._wire.buffer
        if not buffer:
            await self._wait_for(1)
        if buffer[0] != _D:
            return b""
        if len(buffer) < 5:
            await self._wait_for(5)
        limit, unpack = self.max_message_len, _U32.unpack_from
        (length,) = unpack(buffer, 1)
        if length < 4 or length > limit:
            self.terminate()
            raise ProtocolError(f"backend message 'D' of {length} bytes is outside 4..{limit}")
        if len(buffer) < length + 1:
            await self._wait_for(length + 1)
        pos, size = length + 1, len(buffer)
        while pos < max_bytes and pos + 5 <= size and buffer[pos] == _D:
            (length,) = unpack(buffer, pos + 1)
            if length < 4 or length > limit or pos + 1 + length > size:
                break  # not whole yet, or for the next call to refuse
            pos += 1 + length
        with memoryview(buffer) as view:
            rows = bytes(view[:pos])
        del buffer[:pos]
        self._wire.consumed()
        return rows

    async def simple(self, sql: str) -> list[tuple[int, bytes]]:
        """Run ``sql`` with the simple protocol; every message up to ReadyForQuery, included.

        An ErrorResponse is raised as BackendError once ReadyForQuery has come, so the
        connection is usable after it.
        """
        if self.pending:
            raise RuntimeError(f"simple() with {self.pending} answers still to be read")
        self.send(messages.query(sql))
        await self.flush()
        out: list[tuple[int, bytes]] = []
        error: BackendError | None = None
        while True:
            try:
                kind, payload = await self.read()
            except ConnectionError:
                if error is not None:  # a FATAL error, then the server hung up
                    raise error from None
                raise
            out.append((kind, payload))
            if kind == _E and error is None:
                error = BackendError(messages.parse_error_fields(payload))
            elif kind == _Z:
                break
        if error is not None:
            raise error
        return out

    # -- ending

    async def cancel(self) -> None:
        """Ask the server, on a connection of its own, to cancel what this session runs now."""
        async with asyncio.timeout(self.params.connect_timeout_s):
            path = self.params.unix_socket
            if path is not None:
                reader, writer = await asyncio.open_unix_connection(path)
            else:
                reader, writer = await asyncio.open_connection(self.params.host, self.params.port)
            try:
                writer.write(messages.cancel_request(self.pid, self.secret))
                await writer.drain()
                # The server closes the connection once it has acted on the request.
                await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    @property
    def closed(self) -> bool:
        return self._closed or self._wire.ended or self._transport.is_closing()

    def close(self) -> None:
        """End the session politely: Terminate, then close the transport once it is written."""
        if self._closed:
            return
        self._closed = True
        if not self._transport.is_closing():
            self._transport.write(messages.TERMINATE)
        self._transport.close()

    def terminate(self) -> None:
        """Drop the connection now, unsent data and all (deadlines, broken streams)."""
        self._closed = True
        self._transport.abort()

    async def wait_closed(self) -> None:
        """Until the transport is closed (after close or terminate)."""
        await asyncio.shield(self._wire.lost)


# --- a pool ----------------------------------------------------------------------------------

Reset = Callable[[BackendConnection], Awaitable[None]]


async def reset_session(conn: BackendConnection) -> None:
    """The pool's default reset, one round trip: end a transaction left open, then what
    asyncpg's own reset does (advisory locks, cursors, LISTEN, settings).

    Prepared statements stay (no DISCARD ALL): the front end caches its named statements per
    backend connection and keeps track of them itself. RESET ALL brings every setting back
    to its value at connection, the startup packet's server_settings included. The gateway
    refuses advisory locks and LISTEN whatever policy says; releasing them here all the same
    means a session never hands one to the next caller of its backend.
    """
    sql = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL"
    await conn.simple(sql if conn.status == b"I" else "ROLLBACK; " + sql)


class BackendPool:
    """Up to ``max_size`` connections for one BackendParams, created as they are needed.

    Waiters are served first come, first served. A connection goes back through ``reset``
    (None: none, and a connection not idle is then closed); one that is closed, still owes
    answers (``pending``), or fails its reset is dropped, and its place goes to the next
    waiter. ``open`` creates ``min_size`` connections ahead of use.
    """

    def __init__(
        self,
        params: BackendParams,
        *,
        min_size: int = 0,
        max_size: int = 10,
        reset: Reset | None = reset_session,
        reset_timeout_s: float = 5.0,
        max_message_len: int = MAX_MESSAGE_LEN,
    ) -> None:
        if max_size < 1 or not 0 <= min_size <= max_size:
            raise ValueError("need 0 <= min_size <= max_size and max_size >= 1")
        self.params = params
        self.min_size = min_size
        self.max_size = max_size
        self.reset_timeout_s = reset_timeout_s
        self.max_message_len = max_message_len
        self._reset = reset
        self._idle: deque[BackendConnection] = deque()
        # A waiter is handed a connection, or None: a place to open one of its own.
        self._waiters: deque[asyncio.Future[BackendConnection | None]] = deque()
        self._all: set[BackendConnection] = set()
        self._size = 0  # connections open, in use or being opened
        self._closed = False
        self._emptied = asyncio.Event()

    @property
    def size(self) -> int:
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return sum(1 for fut in self._waiters if not fut.done())

    @property
    def closed(self) -> bool:
        return self._closed

    async def open(self) -> None:
        """Create connections up to min_size now (otherwise they are made on demand)."""
        while self._size < self.min_size and not self._closed:
            self._size += 1
            self._give(await self._connect())

    def acquire(self, timeout: float | None = None) -> _Lease:
        """``async with pool.acquire(timeout) as conn``; TimeoutError if none came free in time."""
        return _Lease(self, timeout)

    async def checkout(self, timeout: float | None = None) -> BackendConnection:  # noqa: ASYNC109
        """A connection of the pool's, to hand back with ``release`` (``timeout`` as acquire's)."""
        try:
            async with asyncio.timeout(timeout) as scope:
                return await self._checkout()
        except TimeoutError:
            if scope.expired():
                raise TimeoutError(f"no PostgreSQL connection came free within {timeout}s") from None
            raise  # connect_timeout_s, while opening a connection

    async def _checkout(self) -> BackendConnection:
        if self._closed:
            raise PoolClosed("the pool is closed")
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the warmest caches
            if not conn.closed:
                return conn
            self._drop(conn)
        if self._size < self.max_size:
            self._size += 1
            return await self._connect()
        waiter: asyncio.Future[BackendConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            got = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give(waiter.result())  # handed over as this waiter gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        return got if got is not None else await self._connect()

    async def _connect(self) -> BackendConnection:
        """Open a connection in a place already counted in ``size``."""
        try:
            conn = await BackendConnection.connect(self.params, max_message_len=self.max_message_len)
        except BaseException:
            self._give(None)
            raise
        if self._closed:
            conn.close()
            self._size -= 1
            raise PoolClosed("the pool was closed while a connection was opened")
        self._all.add(conn)
        return conn

    def _give(self, item: BackendConnection | None) -> None:
        """A free connection, or a free place (None), to the first waiter, or back to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return
        if item is None:
            self._size -= 1
        else:
            self._idle.append(item)

    def _drop(self, conn: BackendConnection, polite: bool = False) -> None:
        if polite:
            conn.close()
        else:
            conn.terminate()
        if conn in self._all:
            self._all.discard(conn)
            if self._closed:
                self._size -= 1
                if not self._all:
                    self._emptied.set()
            else:
                self._give(None)

    async def release(self, conn: BackendConnection, reset: bool = True) -> None:
        """Hand a connection back: reset (unless the caller knows it needs none), then to
        the next waiter; dropped if it cannot be."""
        if conn not in self._all:
            if self._closed:
                return  # terminated by close() meanwhile
            raise ValueError("the connection is not this pool's")
        if self._closed or conn.closed or conn.pending:
            self._drop(conn, polite=self._closed and not conn.closed and not conn.pending)
            return
        try:
            if self._reset is not None and reset:
                async with asyncio.timeout(self.reset_timeout_s):
                    await self._reset(conn)
        except Exception as exc:
            log.warning("dropping a PostgreSQL connection whose reset failed: %s", type(exc).__name__)
            self._drop(conn)
            return
        except BaseException:
            self._drop(conn)
            raise
        if conn.closed or conn.pending or conn.status != b"I" or self._closed:
            self._drop(conn)
            return
        self._give(conn)

    def discard(self, conn: BackendConnection) -> None:
        """Drop a connection of the pool's without a round trip (its place is freed)."""
        self._drop(conn)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Close idle connections now, wait up to ``timeout_s`` for the rest, then terminate them."""
        if self._closed and not self._all:
            return
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("the pool is closed"))
        idle = list(self._idle)
        self._idle.clear()
        for conn in idle:
            conn.close()
            self._all.discard(conn)
            self._size -= 1
        if self._all:
            self._emptied.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._emptied.wait()
        for conn in list(self._all):
            conn.terminate()
            self._all.discard(conn)
            self._size -= 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(conn.wait_closed() for conn in idle))


class _Lease:
    """``pool.acquire()``: a connection for the body of an ``async with``."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: BackendPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: BackendConnection | None = None

    async def __aenter__(self) -> BackendConnection:
        self._conn = await self._pool.checkout(self._timeout)
        return self._conn

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Cancelled (a deadline): no round trip in a task being torn down; it goes.
            self._pool.discard(conn)
            return
        await self._pool.release(conn)
