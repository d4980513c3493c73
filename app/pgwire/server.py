"""The PostgreSQL wire protocol's listener: TLS, startup, the bearer token as password, cancel
keys, and the pools of PostgreSQL connections sessions run on (app/pgwire/session.py).

A connection's start, in the order PostgreSQL's own has it:

1. An SSLRequest is answered ``S`` and the connection becomes TLS (QUERYGATE_PG_TLS_CERT_FILE
   and _KEY_FILE), or ``N`` when none is configured; a GSSENCRequest is always ``N``. Bytes
   sent after the SSLRequest before the handshake are refused (CVE-2021-23214).
2. A CancelRequest carries a key the gateway issued (BackendKeyData): it is mapped to the
   session and cancels what that session's PostgreSQL connection runs, in this worker or,
   passed on (CancelPeers), in another. Unknown keys are ignored, as PostgreSQL does, so
   they tell a prober nothing.
3. The StartupMessage must name the configured database and a user; ``options`` and every
   parameter outside the allow-list (session.SETTABLE) are never forwarded.
4. Authentication is cleartext password: the password is the bearer token (OIDC/JWT or a
   Kubernetes service-account token), verified as on HTTP, whose subject must be the user
   name. Outside dev mode it is asked for only over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import ssl
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from app import dberrors
from app.audit import RequestAudit
from app.config import Settings
from app.errors import GatewayError, Unauthenticated, Unavailable
from app.gateway import Gateway
from app.identity import Identity
from app.ids import new_id
from app.metrics import StageClock
from app.pgwire import messages as m
from app.pgwire.backend import BackendConnection, BackendParams, BackendPool
from app.pgwire.session import REPORTED, SETTABLE, Session, WireError, error_message

log = logging.getLogger("querygate.pgwire")

# Above this, a PasswordMessage is refused before it is read: the token limit and its NUL.
PASSWORD_OVERHEAD = 1


_KEY = struct.Struct("!II")  # a CancelRequest's key, as a peer worker is handed it
_PEER_TIMEOUT_S = 0.5


class CancelPeers:
    """A CancelRequest for a session of another worker process (``QUERYGATE_WORKERS``).

    Every worker listens on the one port and the kernel spreads the connections, a cancel's
    own among them: it lands on its session's worker one time in W. So each worker also
    listens on a Unix socket, ``<pid>.sock`` in a directory private to the gateway's user
    (mode 0700, named by a digest of the listening address and the audit spool, so the
    workers of one gateway share it and nothing else does), and passes a key it does not
    know to every other socket there. A worker looks a passed key up in its own sessions
    only, and never passes it on. The key is the whole credential, as on the TCP port, so
    the sockets give nothing a client could not send the port; a directory that is not
    this user's alone turns passing off (logged), and a cancel then works as before.
    """

    def __init__(self, settings: Settings, cancel: Callable[[int, int], Awaitable[None]]) -> None:
        digest = hashlib.sha256(
            f"{settings.pg_host}:{settings.pg_port}:{settings.audit_spool_dir}".encode()
        ).hexdigest()[:16]
        self.directory = Path(tempfile.gettempdir()) / f"querygate-cancel-{os.getuid()}-{digest}"
        self.path = self.directory / f"{os.getpid()}.sock"
        self._cancel = cancel
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            with contextlib.suppress(FileExistsError):
                self.directory.mkdir(mode=0o700)
            info = os.lstat(self.directory)
            if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
                    or info.st_mode & 0o077):
                raise PermissionError("not a directory of this user's alone")
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a dead process's, whose pid this one has now
            self._server = await asyncio.start_unix_server(self._passed, self.path)
            os.chmod(self.path, 0o600)
        except OSError as exc:
            log.error("cancel keys are not passed between workers (%s: %s): a CancelRequest "
                      "reaches only the worker it lands on", self.directory, exc)

    async def _passed(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_PEER_TIMEOUT_S):
                pid, secret = _KEY.unpack(await reader.readexactly(_KEY.size))
            await self._cancel(pid, secret)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            log.exception("a cancel passed by another worker failed")
        finally:
            writer.close()

    async def pass_on(self, pid: int, secret: int) -> None:
        """Hand the key to every other worker; one of them may hold its session."""
        if self._server is None:
            return
        others = [p for p in self.directory.glob("*.sock") if p != self.path]
        await asyncio.gather(*(self._send(p, _KEY.pack(pid, secret)) for p in others))

    @staticmethod
    async def _send(path: Path, key: bytes) -> None:
        try:
            async with asyncio.timeout(_PEER_TIMEOUT_S):
                _, writer = await asyncio.open_unix_connection(path)
                writer.write(key)
                await writer.drain()
                writer.close()
        except (TimeoutError, OSError):
            pass  # a worker that is gone (its socket left behind) or stuck: not this one's

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._server = None


class PgServer:
    """Listens for PostgreSQL clients; the lifespan starts and closes it."""

    def __init__(self, gateway: Gateway, settings: Settings) -> None:
        self.gateway = gateway
        self.settings = settings
        self.instance = secrets.token_hex(3)
        self.defaults: dict[str, str] = {}
        self._server: asyncio.Server | None = None
        self._ssl = _tls_context(settings)
        self._keys: dict[tuple[int, int], Session] = {}
        self._pools: dict[str, BackendPool] = {}
        self._types: dict[int, str] = {}
        self._per_identity: dict[tuple[str, str], int] = {}
        self._connections = 0
        self._starting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pool_lock = asyncio.Lock()
        self._peers = CancelPeers(settings, self._cancel) if settings.workers > 1 else None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        # Worker processes (QUERYGATE_WORKERS) each listen on the port; the kernel spreads
        # the connections. A CancelRequest reaches the worker its connection lands on, which
        # passes a key it does not know to the others (CancelPeers).
        if self._peers is not None:
            await self._peers.start()
        self._server = await asyncio.start_server(
            self._accept, self.settings.pg_host, self.settings.pg_port,
            limit=m.MAX_STARTUP_LEN * 8, reuse_port=self.settings.workers > 1 or None,
        )
        log.info("PostgreSQL wire protocol on %s:%s", self.settings.pg_host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._peers is not None:
            await self._peers.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    async def _cancel(self, pid: int, secret: int) -> None:
        session = self._keys.get((pid, secret))
        if session is not None:
            await session.cancel()

    # -- what sessions use ----------------------------------------------------------------------

    async def pool(self, role: str) -> BackendPool:
        """The pool of connections logged in as masking profile ``role``."""
        pool = self._pools.get(role)
        if pool is not None:
            return pool
        async with self._pool_lock:
            pool = self._pools.get(role)
            if pool is None:
                profiles = self.gateway.profiles
                session = profiles.session(role) if profiles is not None else None
                if session is None or self.settings.database_url is None:
                    raise Unavailable("database_unavailable",
                                      "the masking profile is not ready")
                password, server_settings = session
                params = BackendParams.from_dsn(
                    self.settings.database_url.get_secret_value(), user=role,
                    password=password, server_settings=server_settings,
                    connect_timeout_s=self.settings.db_connect_timeout_ms / 1000,
                )
                pool = BackendPool(params, max_size=self.settings.profile_pool_max)
                self._pools[role] = pool
        return pool

    async def checkout(self, role: str) -> tuple[BackendPool, BackendConnection]:
        """A connection as profile ``role``, within QUERYGATE_POOL_ACQUIRE_TIMEOUT_MS."""
        pool = await self.pool(role)
        try:
            conn = await pool.checkout(timeout=self.settings.pool_acquire_timeout_ms / 1000)
        except TimeoutError:
            raise Unavailable("pool_exhausted", "no database connection came free in time"
                              ) from None
        except (OSError, ConnectionError) as exc:
            raise Unavailable("database_unavailable", "the database is unreachable") from exc
        return pool, conn

    async def type_name(self, oid: int) -> str:
        """pg_type's name of a type (for the facts' cross-check), read once, again on a miss."""
        name = self._types.get(oid)
        if name is None:
            pool = self.gateway.pool
            if pool is None:
                raise Unavailable("database_unavailable", "the database is not connected")
            rows = await pool.fetch("SELECT oid::int8 AS oid, typname FROM pg_catalog.pg_type")
            self._types = {int(r["oid"]): str(r["typname"]) for r in rows}
            name = self._types.get(oid, "unknown")
        return name

    async def check_setting(self, name: str, value: str) -> str:
        """The value PostgreSQL makes of ``SET name = value`` (an error if it refuses it),
        checked on a connection of the gateway's own that its pool then resets."""
        pool = self.gateway.pool
        if pool is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        try:
            async with pool.acquire() as conn:
                normal = await conn.fetchval("SELECT pg_catalog.set_config($1, $2, false)",
                                             name, value)
                if name == "statement_timeout":
                    ms = await conn.fetchval("SELECT setting::int8 FROM pg_catalog.pg_settings "
                                             "WHERE name = 'statement_timeout'")
                    limit = self.settings.statement_timeout_ms
                    if ms == 0 or ms > limit:
                        raise WireError("setting_not_allowed", sqlstate="42501",
                                        message=f"statement_timeout may be at most {limit} ms "
                                        "(QUERYGATE_STATEMENT_TIMEOUT_MS), and not 0")
        except GatewayError:
            raise
        except Exception as exc:
            raise dberrors.translate(exc) from None
        return str(normal)

    async def show(self, name: str) -> str:
        if name in self.defaults:
            return self.defaults[name]
        overrides = {
            "statement_timeout": f"{self.settings.statement_timeout_ms}ms",
            "search_path": ", ".join(self.settings.schemas),
            "transaction_read_only": "off", "default_transaction_read_only": "off",
            "is_superuser": "off",
        }
        if name in overrides:
            return overrides[name]
        pool = self.gateway.pool
        if pool is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        return str(await pool.fetchval("SELECT pg_catalog.current_setting($1)", name))

    # -- connections ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) else "local"
        session: Session | None = None
        key: tuple[int, int] | None = None
        counted: tuple[str, str] | None = None
        self._connections += 1
        try:
            if self._connections > self.settings.pg_max_connections:
                writer.write(m.error_response(m.error_fields(
                    "FATAL", "53300", "querygate: too many connections "
                    "(QUERYGATE_PG_MAX_CONNECTIONS)")))
                return
            if self._starting >= self.settings.pg_max_startups:
                writer.write(m.error_response(m.error_fields(
                    "FATAL", "53300", "querygate: too many connections are authenticating "
                    "(QUERYGATE_PG_MAX_STARTUPS)")))
                return
            self._starting += 1
            try:
                async with asyncio.timeout(self.settings.pg_startup_timeout_ms / 1000):
                    started = await self._startup(reader, writer, peer)
            except TimeoutError:
                writer.write(m.error_response(m.error_fields(
                    "FATAL", "08P01", "querygate: the connection did not authenticate in time "
                    "(QUERYGATE_PG_STARTUP_TIMEOUT_MS)")))
                return
            finally:
                self._starting -= 1
            if started is None:
                return
            reader, writer, identity, params, tls = started
            counted = (identity.issuer, identity.sub)
            held = self._per_identity.get(counted, 0)
            if held >= self.settings.pg_max_connections_per_identity:
                writer.write(m.error_response(m.error_fields(
                    "FATAL", "53300", "querygate: too many connections for this identity "
                    "(QUERYGATE_PG_MAX_CONNECTIONS_PER_IDENTITY)")))
                counted = None
                return
            self._per_identity[counted] = held + 1
            session = Session(self, reader, writer, identity, peer, params, tls)
            key = self._key(session)
            await session.start()
            await self._welcome(writer, session, key)
            await session.run()
        except m.ProtocolError as exc:
            with contextlib.suppress(Exception):
                writer.write(m.error_response(m.error_fields("FATAL", exc.sqlstate,
                                                             f"querygate: {exc.message}")))
        except GatewayError as exc:
            with contextlib.suppress(Exception):
                writer.write(error_message(exc, "FATAL"))
        except (EOFError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("pgwire connection from %s failed", peer)
            with contextlib.suppress(Exception):
                writer.write(m.error_response(m.error_fields(
                    "FATAL", "XX000", "querygate: internal error")))
        finally:
            self._connections -= 1
            if counted is not None:
                left = self._per_identity.get(counted, 1) - 1
                if left > 0:
                    self._per_identity[counted] = left
                else:
                    self._per_identity.pop(counted, None)
            if key is not None:
                self._keys.pop(key, None)
            if session is not None:
                with contextlib.suppress(Exception):
                    await session.close()
            with contextlib.suppress(Exception):
                writer.close()
            self._tasks.discard(task)

    def _key(self, session: Session) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31) or 1, secrets.randbits(32))
            if key not in self._keys:
                self._keys[key] = session
                return key

    async def _startup(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Identity, dict[str, str], bool] | None:
        tls = False
        for _ in range(4):
            packet = await m.read_startup(reader)
            if isinstance(packet, m.SSLRequest):
                if tls:
                    raise m.ProtocolError("SSLRequest on a TLS connection")
                if self._ssl is None:
                    writer.write(b"N")
                    await writer.drain()
                    continue
                if reader._buffer:  # type: ignore[attr-defined]
                    # Bytes injected before the handshake would be read as if from inside it.
                    raise m.ProtocolError("received unencrypted data after SSL request")
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self._ssl)
                tls = True
                continue
            if isinstance(packet, m.GSSENCRequest):
                writer.write(b"N")
                await writer.drain()
                continue
            if isinstance(packet, m.CancelRequest):
                if (packet.pid, packet.secret) in self._keys:
                    await self._cancel(packet.pid, packet.secret)
                elif self._peers is not None:
                    await self._peers.pass_on(packet.pid, packet.secret)
                return None
            break
        else:
            raise m.ProtocolError("too many encryption requests")
        assert isinstance(packet, m.Startup)
        settings = self.settings
        params = packet.params
        if packet.minor > 0:
            writer.write(m.negotiate_protocol_version(
                0, [k for k in params if k.startswith("_pq_.")]))
        if "replication" in params and params["replication"].lower() not in ("false", "off", "0", "no"):
            raise WireError("unsupported_statement", sqlstate="0A000",
                            message="replication connections are not served by the gateway")
        user = packet.user
        if not user:
            raise WireError("invalid_request", sqlstate="28000", message="no user name was given")
        if packet.database != settings.database_name:
            raise WireError("unknown_database", sqlstate="3D000",
                            message=f"the gateway serves database {settings.database_name!r} only")
        audit = RequestAudit(log=self.gateway.audit,  # type: ignore[arg-type]
                             request_id=new_id(), source_ip=peer, method="startup",
                             path="pgwire", clock=StageClock(self.gateway.metrics),
                             channel="pgwire")
        if not tls and not settings.dev_mode:
            error = Unauthenticated("tls_required", "the password (a bearer token) is accepted "
                                    "only over TLS; connect with sslmode=require")
            await audit.auth_failed(error)
            raise error
        writer.write(m.authentication_cleartext_password())
        await writer.drain()
        kind, payload = await m.read_message(reader, settings.max_token_bytes + PASSWORD_OVERHEAD)
        if kind != ord("p"):
            raise m.ProtocolError("expected a password message")
        token = m.PasswordMessage(payload).cleartext()
        try:
            identity = await self.gateway.authenticator.verify_token(token)
            if identity.sub != user:
                raise Unauthenticated("user_mismatch", "the user name must be the token's "
                                      "subject")
        except Unauthenticated as exc:
            await audit.auth_failed(exc)
            raise Unauthenticated(exc.code, f"password authentication failed: {exc.message}"
                                  ) from None
        chosen: dict[str, str] = {}
        ignored = []
        for name, value in params.items():
            key = name.lower()
            if key in ("user", "database"):
                continue
            if key == "client_encoding":
                # asyncpg sends 'utf-8', quotes included.
                if value.strip("'\" ").lower().replace("-", "") not in ("utf8", "unicode"):
                    raise WireError("invalid_parameters", sqlstate="22023",
                                    message="the gateway speaks UTF8 only (client_encoding)")
                continue
            if key in SETTABLE:
                chosen[key] = await self.check_setting(key, value)
            else:
                ignored.append(name)
        if ignored:
            writer.write(m.notice_response(m.error_fields(
                "WARNING", "01000", "querygate: startup parameters not forwarded: "
                + ", ".join(sorted(ignored)))))
        return reader, writer, identity, chosen, tls

    async def _welcome(self, writer: asyncio.StreamWriter, session: Session,
                       key: tuple[int, int]) -> None:
        if not self.defaults:
            await self._load_defaults()
        out = [m.authentication_ok()]
        reported = {
            "server_version": self.defaults["server_version"],
            "server_encoding": "UTF8", "client_encoding": "UTF8",
            "DateStyle": self.defaults["datestyle"], "TimeZone": self.defaults["timezone"],
            "IntervalStyle": self.defaults["intervalstyle"], "integer_datetimes": "on",
            "standard_conforming_strings": "on", "is_superuser": "off",
            "session_authorization": session.identity.sub, "application_name": "",
            "default_transaction_read_only": "off", "in_hot_standby": "off",
        }
        for name, value in session.settings.items():
            if name in REPORTED:
                reported[REPORTED[name]] = value
        for name, value in reported.items():
            out.append(m.parameter_status(name, value))
        out.append(m.backend_key_data(*key))
        out.append(m.ready_for_query(b"I"))
        writer.write(b"".join(out))
        await writer.drain()

    async def _load_defaults(self) -> None:
        pool = self.gateway.pool
        if pool is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        row = await pool.fetchrow(
            "SELECT current_setting('server_version') AS v, current_setting('DateStyle') AS d, "
            "current_setting('TimeZone') AS z, current_setting('IntervalStyle') AS i")
        assert row is not None
        self.defaults = {"server_version": str(row["v"]), "datestyle": str(row["d"]),
                         "timezone": str(row["z"]), "intervalstyle": str(row["i"]),
                         "server_encoding": "UTF8", "client_encoding": "UTF8",
                         "integer_datetimes": "on", "standard_conforming_strings": "on",
                         "application_name": ""}


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    cert, key = settings.pg_tls_cert_file, settings.pg_tls_key_file
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


