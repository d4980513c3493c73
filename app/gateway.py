"""The gateway's clients and the stages that need them: built and torn down by a lifespan.

``Gateway`` holds the asyncpg pools, the catalog, the facts extractor, the OPA client, the
authenticator, the audit log and the per-caller limits; it knows no transport. The pipeline
(app/pipeline.py) drives it; the HTTP front end (app/http/) only builds and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field

import asyncpg
import orjson

from app import grammar, introspection, policy
from app import profiles as masking_profiles
from app.approvals import ApprovalStore, Notifier
from app.audit import AuditLog
from app.catalog import Catalog, introspect
from app.config import ConfigError, Settings
from app.errors import Forbidden, Unavailable
from app.executor import CleanSessions, Executor, Target, connection_settings
from app.facts import FactsExtractor, QueryFacts
from app.identity import Authenticator, Identity
from app.limits import CallerLimits
from app.liveness import Heartbeat
from app.metrics import Metrics
from app.policy import Decision, DecisionCache, PolicyClient
from app.profiles import ProfileDecisions, ProfileError, Profiles, ProfileSpec, quote_ident

log = logging.getLogger("querygate.gateway")


@dataclass(slots=True)
class Gateway:
    """Everything the request path needs; built and torn down by the lifespan."""

    settings: Settings
    authenticator: Authenticator
    extractor: FactsExtractor
    policy: PolicyClient
    decisions: DecisionCache
    mask_key: bytes = b""
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    approvals: ApprovalStore | None = None
    pool: asyncpg.Pool | None = None
    catalog: Catalog | None = None
    executor: Executor | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    audit: AuditLog | None = None
    profiles: Profiles | None = None
    profile_decisions: ProfileDecisions = field(default_factory=lambda: ProfileDecisions(30.0))
    limits: CallerLimits = field(default_factory=lambda: CallerLimits(0, 1, 0))
    heartbeat: Heartbeat = field(default_factory=lambda: Heartbeat(2.0))

    async def connect(self) -> None:
        """Open the pool and read the catalog; failures leave the gateway not ready."""
        settings = self.settings
        assert settings.database_url is not None
        search_path = ", ".join(['"pg_catalog"', *(f'"{s}"' for s in settings.schemas), '"pg_temp"'])
        sessions = CleanSessions()
        self.pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_connect_timeout_ms / 1000,
            # Resolution in the extractor assumes exactly this search path. Not read only by
            # default, unlike the profiles' pools: the gateway's own writes run here
            # (approvals, profiles and their views, the masking key), and of callers'
            # statements only DDL, always in an explicit READ WRITE transaction; no caller's
            # read runs on this pool, so the default would guard nothing.
            server_settings={
                "search_path": search_path,
                "application_name": "querygate",
                **connection_settings(settings.statement_timeout_ms),
            },
            init=sessions.forget,
            reset=sessions.reset,
        )
        await self._check_login_role()
        await self._check_database()
        self.approvals = ApprovalStore(self.pool)
        await self.approvals.migrate()
        self.executor = Executor(
            self.pool, sessions, acquire_timeout_s=settings.pool_acquire_timeout_ms / 1000,
            timeout_s=settings.request_timeout_s,
        )
        self.profiles = Profiles(
            self.pool,
            settings.database_url.get_secret_value(),
            tuple(settings.schemas),
            self.mask_key,
            settings.mask_redact_token,
            # Callers' statements, DDL excepted, run on these: read only by default, so a
            # statement outside an explicit READ WRITE transaction cannot write, whatever the
            # extractor took it for.
            {
                "application_name": "querygate",
                **connection_settings(settings.statement_timeout_ms, read_only=True),
            },
            settings.profile_pool_max,
            settings.max_profiles,
            settings.db_connect_timeout_ms / 1000,
            init=sessions.forget,
            reset=sessions.reset,
        )
        await self.profiles.migrate()
        self.profile_decisions = ProfileDecisions(settings.profile_cache_ttl_s)
        await self.refresh_catalog()

    async def _check_login_role(self) -> None:
        """In prod, refuse a login role that policy could not contain."""
        assert self.pool is not None
        row = await self.pool.fetchrow(
            "SELECT rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user"
        )
        risky = bool(row and (row["rolsuper"] or row["rolbypassrls"]))
        if risky and self.settings.environment == "prod":
            await self.pool.close()
            self.pool = None
            raise ConfigError(
                "QUERYGATE_DATABASE_URL: the gateway's login role is a superuser or bypasses row "
                "security; in prod it must be an ordinary role (SET LOCAL ROLE and RLS rely on it)"
            )
        if risky:
            log.warning("the gateway's login role is a superuser or bypasses RLS (allowed outside prod)")

    async def _check_database(self) -> None:
        """Masking is enforced by the database: refuse to serve where it could not be."""
        assert self.pool is not None
        schemas = tuple(self.settings.schemas)
        prod = self.settings.environment == "prod"
        problems: list[str] = []
        async with self.pool.acquire() as conn:
            version = int(await conn.fetchval("SHOW server_version_num"))
            if not await masking_profiles.initialised(conn):
                problems.append(
                    "the database has not been initialised for masking: run `querygate db init` "
                    "as a DBA (docs/masking.md)"
                )
            else:
                grants = await masking_profiles.public_grants(conn, schemas)
                if grants:
                    problems.append(
                        "PUBLIC holds privileges on exposed objects, so every masking profile "
                        "would too; revoke them: " + "; ".join(grants)
                    )
                owned = await masking_profiles.owned_exposed_tables(conn, schemas) if prod else []
                if owned:
                    problems.append(
                        "the gateway's login role owns exposed relations (an owner bypasses row "
                        "security and can change their privileges): " + ", ".join(owned)
                    )
                if not problems:
                    await masking_profiles.store_key(conn, self.mask_key)
        outdated = masking_profiles.server_version_problem(version)
        if outdated and prod:
            problems.append(outdated)
        elif outdated:
            log.warning("%s; allowed outside prod", outdated)
        if problems:
            await self.pool.close()
            self.pool = None
            raise ConfigError("QUERYGATE_DATABASE_URL: " + " | ".join(problems))

    async def target_for(
        self, identity: Identity, facts: QueryFacts, decision: Decision, sql: str
    ) -> tuple[Target, Decision]:
        """Where the statement runs, and the decision with the masks the database enforces.

        DDL changes objects rather than reading values, and needs the privileges of their
        owner: it runs on the login role's pool (SET LOCAL ROLE the decision's db_role), after
        the profile views of its tables are dropped so PostgreSQL lets it change them. Every
        other statement runs under a masking profile chosen from the identity by policy; the
        decision may only add masks to it.
        """
        assert self.executor is not None and self.profiles is not None
        catalog = self.catalog
        if catalog is None:
            raise Unavailable("database_unavailable", "the catalog has not been read yet")
        profile_masks = await self.profile_masks(identity, catalog, decision.bundle_revision)
        masks = {**decision.masks, **profile_masks}
        if facts.kind == "ddl":
            tables = facts.ddl.targets if facts.ddl is not None else ()
            # DDL runs as the tables' owner, outside every profile: an expression of it that
            # reads a column (ALTER … TYPE … USING ssn, GENERATED ALWAYS AS (ssn), a CHECK
            # that fails on some ssn) would copy or test raw values the caller sees masked.
            copied = sorted(
                f"{table}.{column}"
                for table in tables
                for column in grammar.column_references(sql)
                if f"{table}.{column}" in masks
            )
            # Classification follows names: renaming a masked column, or a table holding
            # one, could move its values out of their class for every reader.
            renamed = sorted(
                f"{table}.{column}" if column else table
                for kind, column in grammar.renames(sql)
                for table in tables
                if (column and f"{table}.{column}" in masks)
                or (kind != "column" and any(m.startswith(f"{table}.") for m in masks))
            )
            if copied or renamed:
                raise Forbidden(
                    "ddl_masked_column",
                    "DDL that reads or renames what is masked for you is refused: "
                    + ", ".join(copied + renamed),
                    columns=copied + renamed,
                    decision_id=decision.id,
                )
            store = self.profiles
            # CREATE makes an unqualified object in the first schema of the path, which must
            # be the configured one the facts resolved it to, not pg_catalog. (The facts
            # refuse unqualified names that pg_catalog shadows, so nothing else resolves
            # differently.)
            ddl_path = ", ".join(
                quote_ident(s) for s in (*self.settings.schemas, "pg_catalog", "pg_temp")
            )

            # Only DDL that PostgreSQL refuses under a dependent view drops the views (a
            # wrong guess here fails closed: the DDL errors, nothing leaks).
            destructive = facts.ddl is not None and (
                facts.ddl.operation == "drop" or {"drop", "alter_type"} & set(facts.ddl.actions)
            )

            async def drop_views(conn: asyncpg.Connection) -> None:
                if destructive:
                    await store.drop_views_of(conn, tables)
                await conn.execute(f"SET LOCAL search_path TO {ddl_path}")

            role = decision.db_role or self.settings.ddl_role
            base = self.executor.target(sql, role)
            return Target(base.pool, sql, role, prelude=drop_views), decision
        spec = ProfileSpec.of(masks, decision.db_role)
        self._check_only(spec, sql, decision)
        try:
            profile = await self.profiles.get(spec, catalog)
        except ProfileError as exc:
            if not isinstance(exc.__cause__, (asyncpg.UndefinedTableError,
                                              asyncpg.UndefinedColumnError)):
                raise
            # The catalog lists a relation or column that is gone (DDL by someone else since
            # the last refresh): read it again, and prepare the profile policy gives the
            # caller over the new catalog (the masking_profile decided anew, so a column
            # that came with the change is masked as policy says; the statement's own
            # decision, over the old catalog, only adds masks), once. The facts are the old
            # catalog's: the executor's cross-check refuses a statement they misdescribe.
            catalog = await self.refresh_catalog()
            masks = {**decision.masks,
                     **await self.profile_masks(identity, catalog, decision.bundle_revision)}
            spec = ProfileSpec.of(masks, decision.db_role)
            self._check_only(spec, sql, decision)
            profile = await self.profiles.get(spec, catalog)
        if facts.introspection:
            # The catalogs as the profile's role may see them (app/introspection.py).
            text = grammar.rewrite_catalog(
                sql, introspection.CATALOG_SCHEMA, introspection.GUARDED_FUNCTIONS,
                introspection.INFORMATION_SCHEMA)
        elif profile.schema_map:
            text = grammar.rewrite_schemas(sql, profile.schema_map)
        else:
            text = sql
        # The decision as enforced: its masks and the profile's (most often the same).
        enforced = decision if masks == decision.masks else dataclasses.replace(decision, masks=masks)
        return Target(profile.pool, text, None, frozenset(masks), profile=spec.role), enforced

    @staticmethod
    def _check_only(spec: ProfileSpec, sql: str, decision: Decision) -> None:
        if spec.masked and (only := grammar.only_relations(sql)):
            raise Forbidden(
                "unsupported_construct",
                "ONLY is not supported for callers with masked columns (their views of a "
                "parent table include its children): " + ", ".join(only),
                decision_id=decision.id,
            )

    async def profile_masks(
        self, identity: Identity, catalog: Catalog, revision: str | None
    ) -> dict[str, str]:
        """The caller's masking_profile masks (cached per identity and catalog version)."""
        identity_input = identity.to_input()
        key = orjson.dumps(
            [identity_input, self.settings.environment, catalog.version],
            option=orjson.OPT_SORT_KEYS,
        )
        cached = self.profile_decisions.get(key, revision)
        if cached is not None:
            return cached
        masks, answered = await self.policy.masking_profile(policy.profile_input(
            identity, catalog, environment=self.settings.environment,
            database=self.settings.database_name,
        ))
        self.profile_decisions.put(key, masks, answered)
        return masks

    async def refresh_catalog(self) -> Catalog:
        """Re-read the catalog; the version (and so the facts cache key) moves on change."""
        if self.pool is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        before = self.catalog
        async with self.pool.acquire() as conn:
            self.catalog = await introspect(conn, tuple(self.settings.schemas), self.catalog)
            if self.profiles is not None:
                await self.profiles.check(conn, self.catalog)
        if before is not None and self.catalog.version != before.version and self.audit:
            # A schema change seen by the gateway, whoever made it.
            with contextlib.suppress(Unavailable):
                await self.audit.record(self.audit.event("catalog_changed", catalog={
                    "version_before": before.version, "version_after": self.catalog.version,
                    "relations": sum(len(t) for t in self.catalog.relations.values()),
                }), gate=False)
        return self.catalog

    async def maintain(self) -> None:
        """Keep trying to connect, then keep the catalog fresh."""
        while True:
            try:
                if self.pool is None:
                    await self.connect()
                else:
                    await self.refresh_catalog()
            except asyncio.CancelledError:
                raise
            except ConfigError as exc:
                log.error("%s", exc)
            except Exception as exc:
                log.warning("database maintenance failed: %s", type(exc).__name__)
            await asyncio.sleep(self.settings.catalog_refresh_s if self.pool is not None else 1.0)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.policy.close()
        await self.notifier.close()
        if self.profiles is not None:
            await self.profiles.close()
        await self.authenticator.close()
        if self.pool is not None:
            await close_pool(self.pool)
        if self.audit is not None:
            # Last: whatever the shutdown recorded is flushed and, if the sink answers, shipped.
            await self.audit.close()


# Shutdown waits this long for a pool's connections to come back, then terminates them all.
POOL_CLOSE_TIMEOUT_S = 5.0


async def close_pool(pool: asyncpg.Pool, timeout_s: float = POOL_CLOSE_TIMEOUT_S) -> None:
    """Close ``pool`` gracefully within ``timeout_s``, else terminate its connections."""
    try:
        # asyncpg's close() waits for every connection to be released, however long.
        await asyncio.wait_for(pool.close(), timeout_s)
    except Exception:
        pool.terminate()
