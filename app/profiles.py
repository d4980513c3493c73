"""Masking that PostgreSQL enforces: masking profiles, each a set of views, a role and a pool.

The facts extractor is a model of SQL, and a model is always slightly wrong; in a security
boundary every divergence is a leak (a CTE forward reference, an output name sqlglot
spells differently, an error that quotes a value). So a statement whose caller sees masked
columns does not run against the tables at all:

- A **profile** is a set of masks (``schema.table.column → strategy``) plus an optional
  ``db_role``. It is chosen from the identity by policy (``data.querygate.masking_profile``,
  over every exposed column), never from what the extractor says a statement reads; the
  per-statement decision may only add masks to it.
- A masked profile has, per exposed schema, a schema of **views** (``qgp_<key>_<schema>``)
  with the same relation and column names as the tables, masked columns computed by the
  SQL masking functions of ``querygate_mask``. The views are owned by
  ``querygate_mask_owner`` (not the login role, not the tables' owner), so the base tables
  are read with its rights; the profile's role may read the views and nothing of the tables.
- Each profile has its own **LOGIN role** and **pool**: the session user is the profile
  role, a member of nothing it could switch to, so ``RESET ROLE`` or
  ``set_config('role', …)`` inside a statement gets nowhere. Its ``search_path`` puts its
  view schemas first, so PostgreSQL's own name resolution decides what ``orders`` means.
  Schema-qualified names (``"public"."customers"``) are the one rewrite: the schema token,
  at the byte offsets PostgreSQL's parser reports (app/grammar.py), becomes the profile's.
- A raw profile (no masks) is a LOGIN role that inherits ``querygate_raw`` (or the
  decision's ``db_role``) without the right to ``SET ROLE`` to it: callers who may see raw
  values still never run as the gateway's login role.

Roles are created by the login role (``CREATEROLE``, granted by ``querygate db init``);
passwords are derived from the masking key, so every replica computes the same one, and only
their SCRAM verifiers reach the server. Views follow the catalog: every refresh that
changes it re-syncs the active profiles before a statement runs under them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from app import introspection
from app.catalog import Catalog, Relation
from app.errors import Unavailable

log = logging.getLogger("querygate.profiles")

MASK_SCHEMA = "querygate_mask"
MASK_OWNER = "querygate_mask_owner"
RAW_ROLE = "querygate_raw"
ROLE_PREFIX = "qg_p_"
SCHEMA_PREFIX = "qgp_"
TEXT_TYPES = frozenset({"text", "varchar", "bpchar", "name", "citext", "char"})
MIN_PROD_SERVER_VERSION = 160005  # CVE-2024-10976 and CVE-2024-10978 (RLS, SET ROLE)


def server_version_problem(version_num: int) -> str | None:
    """Why this server (``server_version_num``) must not serve prod, or None."""
    if version_num >= MIN_PROD_SERVER_VERSION:
        return None
    major, minor = divmod(version_num, 10000)
    return (
        f"PostgreSQL {major}.{minor} is older than 16.5, which fixes CVE-2024-10976 and "
        "CVE-2024-10978 (row security and SET ROLE in cached plans); masking relies on both"
    )


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, always quoted."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A string literal (standard_conforming_strings is on since PostgreSQL 9.1)."""
    if "\\" in text or "\x00" in text:
        raise ValueError("masking tokens may not contain backslashes or NUL")
    return "'" + text.replace("'", "''") + "'"


# --- the SQL masking functions ------------------------------------------------------------
# Each reproduces one of app/masking.py's strategies exactly (for text input), is IMMUTABLE
# and cannot raise: no cast of the input to another type, so no error can quote it.

MASK_FUNCTIONS_SQL = f"""
CREATE OR REPLACE FUNCTION {MASK_SCHEMA}.email(v text, token text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN v IS NULL THEN NULL
    WHEN v ~ '^.+@[^@]*$' THEN left(v, 1) || '***@' || substring(v FROM '@([^@]*)$')
    ELSE token
END;

CREATE OR REPLACE FUNCTION {MASK_SCHEMA}.pan(v text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN v IS NULL THEN NULL
    WHEN length(regexp_replace(v, '[^0-9]', '', 'g')) >= 12
        THEN regexp_replace(v, '[0-9](?=(?:[^0-9]*[0-9]){{4}})', '*', 'g')
    ELSE regexp_replace(v, '[0-9]', '*', 'g')
END;

CREATE OR REPLACE FUNCTION {MASK_SCHEMA}.partial(v text, head integer, tail integer)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE
    WHEN v IS NULL THEN NULL
    WHEN head + tail >= length(v) OR (head + tail) * 3 > length(v) * 2
        THEN repeat('*', length(v))
    ELSE left(v, head) || repeat('*', length(v) - head - tail) || right(v, tail)
END;
"""

KEY_TABLE_SQL = f"""
CREATE TABLE IF NOT EXISTS {MASK_SCHEMA}.hmac_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    ipad bytea NOT NULL,
    opad bytea NOT NULL
);
REVOKE ALL ON {MASK_SCHEMA}.hmac_key FROM PUBLIC;
"""


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """HMAC-SHA256's inner and outer keys (RFC 2104), so a view can compute it with sha256()."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def mask_expression(strategy: str, column: str, type_name: str, token: str) -> str:
    """The SQL computing ``strategy`` of ``t.<column>``; never the raw column itself."""
    ref = f"t.{quote_ident(column)}"
    as_text = ref if type_name in TEXT_TYPES else f"{ref}::text"
    if strategy == "null" or (strategy == "redact" and type_name not in TEXT_TYPES):
        # Always NULL, of the column's own type.
        return f"(CASE WHEN false THEN {ref} END)"
    if strategy == "redact":
        return f"(CASE WHEN {ref} IS NULL THEN NULL ELSE {quote_literal(token)}::text END)"
    if strategy == "email":
        return f"{MASK_SCHEMA}.email({as_text}, {quote_literal(token)})"
    if strategy == "pan":
        return f"{MASK_SCHEMA}.pan({as_text})"
    if strategy == "hash":
        # The key is read with the view owner's rights; the caller can read neither it nor
        # the column. A scalar subquery keeps the view automatically updatable.
        return (
            f"(SELECT encode(sha256(k.opad || sha256(k.ipad || convert_to({as_text}, 'UTF8'))),"
            f" 'hex') FROM {MASK_SCHEMA}.hmac_key k WHERE {ref} IS NOT NULL)"
        )
    if strategy.startswith("partial"):
        head, tail = 0, 4
        if strategy != "partial":
            _, h, t = strategy.split(":")
            head, tail = int(h), int(t)
        return f"{MASK_SCHEMA}.partial({as_text}, {head}, {tail})"
    raise ValueError(f"unknown masking strategy {strategy!r}")


# --- profiles --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """What a statement may see: its masks and the role whose privileges it has."""

    masks: tuple[tuple[str, str], ...]
    db_role: str | None = None
    # Derived from the two above once (every statement looks its profile up by it).
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(orjson.dumps([self.masks, self.db_role])).hexdigest()
        object.__setattr__(self, "key", digest[:16])

    @classmethod
    def of(cls, masks: Mapping[str, str], db_role: str | None = None) -> ProfileSpec:
        return cls(tuple(sorted(masks.items())), db_role)

    @property
    def role(self) -> str:
        return ROLE_PREFIX + self.key

    @property
    def masked(self) -> bool:
        return bool(self.masks)

    def view_schema(self, schema: str) -> str:
        return f"{SCHEMA_PREFIX}{self.key}_{schema}"[:63]

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "masks": dict(self.masks), "db_role": self.db_role}


def view_definition(spec: ProfileSpec, relation: Relation, token: str) -> str:
    """The SELECT of the profile's view of ``relation``, columns in the table's order."""
    masks = dict(spec.masks)
    items = []
    for column, type_name in relation.columns.items():
        strategy = masks.get(f"{relation.schema}.{relation.name}.{column}")
        expr = f"t.{quote_ident(column)}" if strategy is None else mask_expression(
            strategy, column, type_name, token
        )
        items.append(f"{expr} AS {quote_ident(column)}")
    return (
        f"SELECT {', '.join(items)} "
        f"FROM {quote_ident(relation.schema)}.{quote_ident(relation.name)} t"
    )


def scram_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores (RFC 7677), so the password never travels."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


@dataclass(slots=True)
class Profile:
    """A profile that exists in the database, with its pool."""

    spec: ProfileSpec
    pool: asyncpg.Pool
    search_path: str
    schema_map: dict[str, str]
    catalog_version: int
    used: float = field(default_factory=time.monotonic)


class ProfileError(Unavailable):
    """A profile could not be created or synced: nothing runs."""


INTERNAL_SQL = """
CREATE SCHEMA IF NOT EXISTS querygate_internal;
CREATE TABLE IF NOT EXISTS querygate_internal.profiles (
    role text PRIMARY KEY,
    spec jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


async def _catalog_views(conn: asyncpg.Connection) -> None:
    """Create ``querygate_catalog`` (app/introspection.py) as the views' owner, again when
    its definitions or the catalogs' columns (they follow the major version) changed: the
    schema's comment holds their digest."""
    columns = {r["relname"]: list(r["columns"]) for r in await conn.fetch(
        introspection.CATALOG_COLUMNS_SQL, sorted(introspection.CATALOG_VIEWS))}
    sql = introspection.catalog_views_sql(columns)
    digest = hashlib.sha256(sql.encode()).hexdigest()[:32]
    schema = quote_ident(introspection.CATALOG_SCHEMA)
    current = await conn.fetchval(
        "SELECT obj_description(oid, 'pg_namespace') FROM pg_catalog.pg_namespace "
        "WHERE nspname = $1", introspection.CATALOG_SCHEMA)
    if current == digest:
        return
    await conn.execute(f"SET LOCAL ROLE {quote_ident(MASK_OWNER)}")
    await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    await conn.execute(
        f"DROP SCHEMA IF EXISTS {quote_ident(introspection.INFORMATION_SCHEMA)} CASCADE")
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.execute(sql)
    await conn.execute(f"COMMENT ON SCHEMA {schema} IS {quote_literal(digest)}")
    await conn.execute("RESET ROLE")


class Profiles:
    """Creates, syncs and pools masking profiles on demand (one per distinct spec)."""

    def __init__(
        self,
        login_pool: asyncpg.Pool,
        dsn: str,
        schemas: tuple[str, ...],
        secret: bytes,
        token: str,
        server_settings: Mapping[str, str],
        pool_max: int,
        max_profiles: int = 64,
        connect_timeout_s: float = 5.0,
        init: Any = None,
        reset: Any = None,
    ) -> None:
        self._login = login_pool
        self._dsn = dsn
        self._schemas = schemas
        self._secret = secret
        self._token = token
        self._settings = dict(server_settings)
        self._pool_max = pool_max
        self._max = max_profiles
        self._timeout = connect_timeout_s
        self._init = init
        self._reset = reset
        self._profiles: OrderedDict[str, Profile] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def migrate(self) -> None:
        """The gateway's own record of the profiles it created (querygate db sync reads it)."""
        async with self._login.acquire() as conn, conn.transaction():
            # Gateways (and worker processes) start at once; CREATE … IF NOT EXISTS is not
            # safe against a concurrent create, so this runs under the approvals' migration lock.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('querygate.migrate'))")
            await conn.execute(INTERNAL_SQL)
            await _catalog_views(conn)

    # -- passwords
    def password(self, role: str) -> str:
        return hmac.new(self._secret, b"querygate-profile-password:" + role.encode(),
                        hashlib.sha256).hexdigest()

    def session(self, role: str) -> tuple[str, dict[str, str]] | None:
        """The password and session settings a connection as profile ``role`` is opened
        with (the wire protocol's own pools, app/pgwire/session.py), as this store's pool
        for it has them; None for a profile this store has not opened."""
        for profile in self._profiles.values():
            if profile.spec.role == role:
                return self.password(role), {**self._settings, "search_path": profile.search_path}
        return None

    def _salt(self, role: str) -> bytes:
        return hmac.new(self._secret, b"querygate-profile-salt:" + role.encode(),
                        hashlib.sha256).digest()[:16]

    # -- the public entry point
    async def get(self, spec: ProfileSpec, catalog: Catalog) -> Profile:
        """The profile for ``spec``, created or re-synced to ``catalog`` first if needed."""
        profile = self._profiles.get(spec.key)
        if profile is not None and profile.catalog_version == catalog.version:
            profile.used = time.monotonic()
            return profile
        lock = self._locks.setdefault(spec.key, asyncio.Lock())
        async with lock:
            profile = self._profiles.get(spec.key)
            if profile is not None and profile.catalog_version == catalog.version:
                return profile
            if profile is None and len(self._profiles) >= self._max:
                await self._evict()
            try:
                await self._materialise(spec, catalog)
            except asyncpg.PostgresError as exc:
                log.error("masking profile %s could not be prepared: %s (%s)", spec.role,
                          type(exc).__name__, getattr(exc, "sqlstate", ""))
                raise ProfileError(
                    "profile_unavailable",
                    "the masking profile for this request could not be prepared in the "
                    "database; run `querygate db init` (docs/masking.md)",
                ) from exc
            if profile is None:
                profile = await self._open(spec, catalog.version)
                self._profiles[spec.key] = profile
            else:
                profile.catalog_version = catalog.version
            return profile

    async def _evict(self) -> None:
        key, oldest = min(self._profiles.items(), key=lambda kv: kv[1].used)
        del self._profiles[key]
        await oldest.pool.close()

    def _search_path(self, spec: ProfileSpec) -> tuple[str, dict[str, str]]:
        mapping = {s: spec.view_schema(s) for s in self._schemas} if spec.masked else {}
        parts = ["pg_catalog", *mapping.values(), *self._schemas, "pg_temp"]
        return ", ".join(quote_ident(p) for p in parts), mapping

    async def _open(self, spec: ProfileSpec, version: int) -> Profile:
        search_path, mapping = self._search_path(spec)
        pool = await asyncpg.create_pool(
            self._dsn,
            user=spec.role,
            password=self.password(spec.role),
            min_size=0,
            max_size=self._pool_max,
            timeout=self._timeout,
            # Idle connections of a profile nobody uses any more go back soon: each
            # profile has a pool, and the server's connections are shared by all of them.
            max_inactive_connection_lifetime=60,
            server_settings={**self._settings, "search_path": search_path},
            init=self._init,
            reset=self._reset,
        )
        return Profile(spec, pool, search_path, mapping, version)

    async def _materialise(self, spec: ProfileSpec, catalog: Catalog) -> None:
        """Create or update the role, its grants and (masked) its views, in one transaction."""
        role = quote_ident(spec.role)
        verifier = scram_verifier(self.password(spec.role), self._salt(spec.role))
        async with self._login.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", spec.role)
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1", spec.role
            )
            if exists:
                # The same verifier when the masking key is the same (every replica's).
                await conn.execute(f"ALTER ROLE {role} PASSWORD {quote_literal(verifier)}")
            else:
                await conn.execute(
                    f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                    f"NOREPLICATION NOBYPASSRLS INHERIT PASSWORD {quote_literal(verifier)}"
                )
            if not spec.masked:
                member_of = spec.db_role or RAW_ROLE
                # Its privileges, but never the right to become it (PostgreSQL 16).
                await conn.execute(
                    f"GRANT {quote_ident(member_of)} TO {role} WITH INHERIT TRUE, SET FALSE"
                )
            else:
                await sync_profile_views(conn, spec, catalog, self._token)
            await conn.execute(
                "INSERT INTO querygate_internal.profiles (role, spec) VALUES ($1, $2::jsonb) "
                "ON CONFLICT (role) DO NOTHING",
                spec.role, orjson.dumps(spec.to_json()).decode(),
            )

    async def drop_views_of(self, conn: asyncpg.Connection, relations: Iterable[str]) -> None:
        """Drop every profile's view of these tables (``schema.name``), so DDL on them can run.

        Called inside the DDL's own transaction: the views come back at the next sync,
        and meanwhile a masked caller's name resolves to the table, which it may not read.
        The views are found by PostgreSQL's own dependency records, whoever created them.
        """
        names = [
            ".".join(quote_ident(part) for part in r.split(".", 1)) for r in relations if "." in r
        ]
        if not names:
            return
        await _drop_profile_views(conn, await conn.fetch(_DEPENDENT_VIEWS_SQL, names))
        # Every cached profile must be re-synced before it serves again.
        for profile in self._profiles.values():
            profile.catalog_version = -1

    async def check(self, conn: asyncpg.Connection, catalog: Catalog) -> int:
        """Mark stale every masked profile whose views are not all there (dropped by a
        migration or ``db sync --drop-views`` without a schema change); the number marked."""
        masked = [p for p in self._profiles.values() if p.spec.masked]
        if not masked:
            return 0
        counts = {
            r["nspname"]: r["n"]
            for r in await conn.fetch(
                "SELECT n.nspname, count(c.oid) AS n FROM pg_catalog.pg_namespace n "
                "LEFT JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relkind = 'v' "
                "WHERE n.nspname = ANY($1::text[]) GROUP BY n.nspname",
                [p.spec.view_schema(s) for p in masked for s in self._schemas],
            )
        }
        stale = 0
        for profile in masked:
            for schema in self._schemas:
                if counts.get(profile.spec.view_schema(schema), 0) != len(
                    catalog.relations.get(schema, {})
                ):
                    profile.catalog_version = -1
                    stale += 1
                    break
        return stale

    async def resync_recorded(self, catalog: Catalog) -> int:
        """Sync the views of every profile any gateway of this database recorded.

        Best effort: the DDL that asks for it has committed. A failure leaves this process's
        profiles stale, so each re-syncs (or refuses) before its next statement.
        """
        try:
            async with self._login.acquire() as conn:
                synced = await sync_views(conn, await recorded_profiles(conn), catalog,
                                          self._token)
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("masking views not re-synced after DDL: %s (%s)", type(exc).__name__,
                        getattr(exc, "sqlstate", ""))
            for profile in self._profiles.values():
                profile.catalog_version = -1
            return 0
        for profile in self._profiles.values():
            if profile.spec.masked:
                profile.catalog_version = catalog.version
        return synced

    async def close(self) -> None:
        profiles, self._profiles = list(self._profiles.values()), OrderedDict()

        async def close(pool: asyncpg.Pool) -> None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                # A connection still in use (or wedged) past the bound: cut, not awaited.
                pool.terminate()

        # All at once: shutdown takes at most 5 s however many profiles are open.
        await asyncio.gather(*(close(profile.pool) for profile in profiles))

    def active(self) -> list[ProfileSpec]:
        return [p.spec for p in self._profiles.values()]


class ProfileDecisions:
    """``masking_profile`` answers, reused per (identity, environment, catalog version).

    The answer depends on the identity and policy alone, so it is asked once per caller and
    kept for ``ttl_s``; a decision from another bundle revision drops it before it is used.
    """

    def __init__(self, ttl_s: float, size: int = 4096) -> None:
        self._ttl = ttl_s
        self._size = size
        self._entries: OrderedDict[bytes, tuple[float, dict[str, str], str | None]] = OrderedDict()

    def get(self, key: bytes, revision: str | None) -> dict[str, str] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, masks, cached_revision = entry
        if time.monotonic() >= expires or cached_revision != revision:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return masks

    def put(self, key: bytes, masks: dict[str, str], revision: str | None) -> None:
        if self._ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + self._ttl, masks, revision)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


async def sync_profile_views(conn: asyncpg.Connection, spec: ProfileSpec, catalog: Catalog,
                             token: str) -> None:
    """Create, replace or drop the profile's views so they match ``catalog`` (in a transaction).

    A view whose definition and grants are unchanged (its comment holds their digest) is
    left alone; a changed one is dropped and created, since CREATE OR REPLACE VIEW can
    neither drop nor rename a column.
    """
    role = quote_ident(spec.role)
    # The profile's own lock (as _materialise takes it; it nests): another gateway process
    # syncing or creating the same views waits instead of failing on a half-made schema.
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", spec.role)
    await conn.execute(f"SET LOCAL ROLE {quote_ident(MASK_OWNER)}")
    await conn.execute(f"GRANT USAGE ON SCHEMA {MASK_SCHEMA} TO {role}")
    for schema in catalog.schemas:
        target = spec.view_schema(schema)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(target)}")
        await conn.execute(f"GRANT USAGE ON SCHEMA {quote_ident(target)} TO {role}")
        existing = {
            r["relname"]: r["digest"]
            for r in await conn.fetch(
                "SELECT c.relname, obj_description(c.oid, 'pg_class') AS digest "
                "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'v'",
                target,
            )
        }
        wanted = catalog.relations.get(schema, {})
        for name in set(existing) - set(wanted):
            await conn.execute(f"DROP VIEW IF EXISTS {quote_ident(target)}.{quote_ident(name)}")
        for name, relation in wanted.items():
            definition = view_definition(spec, relation, token)
            privileges = await _privileges(conn, spec, relation)
            digest = hashlib.sha256(
                orjson.dumps([definition, privileges])
            ).hexdigest()[:32]
            if existing.get(name) == digest:
                continue
            view = f"{quote_ident(target)}.{quote_ident(name)}"
            # Drop and create: CREATE OR REPLACE cannot rename or drop a column.
            await conn.execute(f"DROP VIEW IF EXISTS {view}")
            await conn.execute(f"CREATE VIEW {view} AS {definition}")
            await conn.execute(f"COMMENT ON VIEW {view} IS {quote_literal(digest)}")
            if privileges:
                await conn.execute(f"GRANT {', '.join(privileges)} ON {view} TO {role}")
    await conn.execute("RESET ROLE")

async def _privileges(conn: asyncpg.Connection, spec: ProfileSpec,
                      relation: Relation) -> list[str]:
    """What the profile may do through its view: everything, or what ``db_role`` may."""
    kinds = ["SELECT", "INSERT", "UPDATE", "DELETE"]
    if relation.kind not in ("table", "partitioned_table"):
        kinds = ["SELECT"]
    if spec.db_role is None:
        return kinds
    granted = []
    for kind in kinds:
        if await conn.fetchval(
            "SELECT has_table_privilege($1, $2, $3)",
            spec.db_role, f"{quote_ident(relation.schema)}.{quote_ident(relation.name)}", kind,
        ):
            granted.append(kind)
    return granted



async def recorded_profiles(conn: asyncpg.Connection) -> list[ProfileSpec]:
    """Every profile the gateways of this database created (querygate_internal.profiles)."""
    if not await conn.fetchval("SELECT to_regclass('querygate_internal.profiles') IS NOT NULL"):
        return []
    specs = []
    for row in await conn.fetch("SELECT spec FROM querygate_internal.profiles ORDER BY role"):
        spec = orjson.loads(row["spec"])
        specs.append(ProfileSpec.of(spec.get("masks") or {}, spec.get("db_role")))
    return specs


async def sync_views(conn: asyncpg.Connection, specs: Iterable[ProfileSpec], catalog: Catalog,
                     token: str) -> int:
    """Bring every masked profile's views in line with ``catalog``; the number synced."""
    synced = 0
    for spec in specs:
        if spec.masked:
            async with conn.transaction():
                await sync_profile_views(conn, spec, catalog, token)
            synced += 1
    return synced


_PROFILE_VIEWS_SQL = """
SELECT n.nspname, v.relname FROM pg_catalog.pg_class v
JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace
WHERE v.relkind = 'v' AND n.nspname LIKE 'qgp\\_%'
"""

# The profile views whose rewrite rule depends on one of these relations ($1: quoted names).
_DEPENDENT_VIEWS_SQL = _PROFILE_VIEWS_SQL + """
AND v.oid IN (
    SELECT r.ev_class FROM pg_catalog.pg_rewrite r
    JOIN pg_catalog.pg_depend d
      ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
    WHERE d.refclassid = 'pg_catalog.pg_class'::regclass
      AND d.refobjid IN (SELECT to_regclass(x) FROM unnest($1::text[]) x)
)
"""


async def _drop_profile_views(conn: asyncpg.Connection, views: Iterable[Any]) -> None:
    """Drop these (nspname, relname) views as their owner, inside the caller's transaction."""
    await conn.execute(f"SET LOCAL ROLE {quote_ident(MASK_OWNER)}")
    for nspname, relname in views:
        await conn.execute(f"DROP VIEW IF EXISTS {quote_ident(nspname)}.{quote_ident(relname)}")
    await conn.execute("RESET ROLE")


async def drop_all_views(conn: asyncpg.Connection) -> int:
    """Drop every profile's views (before a migration that drops or retypes columns).

    The gateway creates them again from the new catalog before it serves a masked
    statement; meanwhile masked callers resolve names to the tables and are refused.
    """
    async with conn.transaction():
        rows = await conn.fetch(_PROFILE_VIEWS_SQL)
        await _drop_profile_views(conn, rows)
    return len(rows)


# --- one-time initialisation (querygate db init) and the start-up checks ---------------------


async def store_key(conn: asyncpg.Connection, key: bytes) -> None:
    """Put the HMAC pads where only the view owner can read them (parameters, never text)."""
    ipad, opad = hmac_pads(key)
    async with conn.transaction():
        await conn.execute(f"SET LOCAL ROLE {quote_ident(MASK_OWNER)}")
        await conn.execute(
            f"INSERT INTO {MASK_SCHEMA}.hmac_key (singleton, ipad, opad) VALUES (true, $1, $2) "
            "ON CONFLICT (singleton) DO UPDATE SET ipad = EXCLUDED.ipad, opad = EXCLUDED.opad "
            f"WHERE {MASK_SCHEMA}.hmac_key.ipad IS DISTINCT FROM EXCLUDED.ipad",
            ipad, opad,
        )


def init_statements(login_role: str, database: str, schemas: Iterable[str],
                    table_owners: Iterable[str], db_roles: Iterable[str] = ()) -> list[str]:
    """What ``querygate db init`` runs as a DBA: idempotent, each statement on its own."""
    login = quote_ident(login_role)
    owner = quote_ident(MASK_OWNER)
    raw = quote_ident(RAW_ROLE)
    statements = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{MASK_OWNER}') "
        f"THEN CREATE ROLE {owner} NOLOGIN NOINHERIT; END IF; END $$",
        f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{RAW_ROLE}') "
        f"THEN CREATE ROLE {raw} NOLOGIN NOINHERIT; END IF; END $$",
        # The login role creates profile roles, and may act as the views' owner to create
        # them, but holds neither role's privileges itself.
        f"ALTER ROLE {login} CREATEROLE",
        f"GRANT {owner} TO {login} WITH INHERIT FALSE, SET TRUE",
        f"GRANT {raw} TO {login} WITH ADMIN TRUE, INHERIT FALSE, SET FALSE",
        f"GRANT CREATE ON DATABASE {quote_ident(database)} TO {owner}",
        f"CREATE SCHEMA IF NOT EXISTS {MASK_SCHEMA} AUTHORIZATION {owner}",
        f"SET ROLE {owner}",
        MASK_FUNCTIONS_SQL,
        KEY_TABLE_SQL,
        "RESET ROLE",
        # Bound parameters (the HMAC pads) never reach the server's log.
        f"ALTER ROLE {login} SET log_parameter_max_length = 0",
        f"ALTER ROLE {login} SET log_parameter_max_length_on_error = 0",
    ]
    for role in db_roles:
        statements.append(f"GRANT {quote_ident(role)} TO {login} WITH ADMIN TRUE")
    for schema in schemas:
        s = quote_ident(schema)
        statements += [
            f"GRANT USAGE ON SCHEMA {s} TO {owner}, {raw}",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {s} TO {owner}, {raw}",
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {owner}, {raw}",
        ]
        for table_owner in table_owners:
            o = quote_ident(table_owner)
            statements += [
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {o} IN SCHEMA {s} "
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {owner}, {raw}",
                f"ALTER DEFAULT PRIVILEGES FOR ROLE {o} IN SCHEMA {s} "
                f"GRANT USAGE, SELECT ON SEQUENCES TO {owner}, {raw}",
            ]
    return statements


TABLE_OWNERS_SQL = """
SELECT DISTINCT pg_catalog.pg_get_userbyid(c.relowner) AS owner
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
"""


async def db_init(conn: asyncpg.Connection, login_role: str, database: str,
                  schemas: tuple[str, ...], db_roles: Iterable[str] = ()) -> list[str]:
    """Run the initialisation; returns the PUBLIC grants that must be revoked (empty: ready)."""
    owners = {r["owner"] for r in await conn.fetch(TABLE_OWNERS_SQL, list(schemas))}
    owners.add(login_role)
    for statement in init_statements(login_role, database, schemas, sorted(owners), db_roles):
        await conn.execute(statement)
    return await public_grants(conn, schemas)


PUBLIC_GRANTS_SQL = """
SELECT format('%s ON TABLE %I.%I', a.privilege_type, n.nspname, c.relname)
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace,
     LATERAL aclexplode(c.relacl) a
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'p', 'f') AND a.grantee = 0
UNION ALL
SELECT format('%s (%I) ON TABLE %I.%I', a.privilege_type, att.attname, n.nspname, c.relname)
FROM pg_catalog.pg_attribute att
JOIN pg_catalog.pg_class c ON c.oid = att.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace,
     LATERAL aclexplode(att.attacl) a
WHERE n.nspname = ANY($1::text[]) AND att.attnum > 0 AND a.grantee = 0
UNION ALL
SELECT format('EXECUTE ON FUNCTION %I.%I (SECURITY DEFINER)', n.nspname, p.proname)
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY($1::text[]) AND p.prosecdef
  AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))
UNION ALL
SELECT format('CREATE ON SCHEMA %I', n.nspname)
FROM pg_catalog.pg_namespace n, LATERAL aclexplode(n.nspacl) a
WHERE n.nspname = ANY($1::text[]) AND a.grantee = 0 AND a.privilege_type = 'CREATE'
ORDER BY 1
"""


async def public_grants(conn: asyncpg.Connection, schemas: tuple[str, ...]) -> list[str]:
    """Privileges on exposed objects that PUBLIC, and so every profile role, holds.

    Table and column privileges reach a profile role around its views; a SECURITY DEFINER
    function runs with its owner's rights; CREATE on a schema lets a profile plant objects
    in it. (Plain functions run with the caller's rights: they see what the profile sees.)
    """
    return [r[0] for r in await conn.fetch(PUBLIC_GRANTS_SQL, list(schemas))]


async def owned_exposed_tables(conn: asyncpg.Connection, schemas: tuple[str, ...]) -> list[str]:
    """Exposed relations the current (login) role owns: their owner bypasses RLS."""
    rows = await conn.fetch(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'p', 'f') "
        "AND pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE') ORDER BY 1",
        list(schemas),
    )
    return [r[0] for r in rows]


async def initialised(conn: asyncpg.Connection) -> bool:
    """Has ``querygate db init`` run in this database?"""
    return bool(await conn.fetchval(
        "SELECT count(*) = 2 FROM pg_catalog.pg_roles WHERE rolname = ANY($1::text[])",
        [MASK_OWNER, RAW_ROLE],
    ) and await conn.fetchval(
        # Not to_regclass(): the login role has no USAGE on the masking schema.
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = 'hmac_key')",
        MASK_SCHEMA,
    ))
