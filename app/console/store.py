"""The console's clients: the index pool and the ingester, built from the settings."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from app.audit import kafka_security
from app.config import ConfigError, Settings
from app.console import index
from app.console.ingest import FileIngester, KafkaIngester


def audit_file(settings: Settings) -> Path:
    """The JSONL file the console indexes: its own setting, else the gateway's file sink's."""
    if settings.console_audit_file is not None:
        return settings.console_audit_file
    if settings.audit_file is not None:
        return settings.audit_file
    if settings.audit_spool_dir is not None:
        return settings.audit_spool_dir / "audit.jsonl"
    raise ConfigError("QUERYGATE_CONSOLE_AUDIT_FILE is required with QUERYGATE_CONSOLE_SOURCE=file")


async def open_pool(settings: Settings) -> asyncpg.Pool:
    """The index pool; the schema is migrated before it is handed out."""
    if settings.console_database_url is None:
        raise ConfigError("QUERYGATE_CONSOLE_DATABASE_URL is required (the audit index)")
    pool = await asyncpg.create_pool(
        settings.console_database_url.get_secret_value(), min_size=1, max_size=8,
        timeout=settings.db_connect_timeout_ms / 1000,
        server_settings=index.SERVER_SETTINGS,
        # Every page query is bounded; a slow one is an error page, not a hung worker.
        command_timeout=10,
    )
    try:
        async with pool.acquire() as conn:
            await index.migrate(conn)
    except BaseException:
        await pool.close()
        raise
    return pool


def make_ingester(settings: Settings, pool: asyncpg.Pool) -> FileIngester | KafkaIngester:
    """The ingester for the configured source."""
    poll_s = settings.console_ingest_poll_ms / 1000
    if settings.console_source == "kafka":
        if not settings.audit_kafka_bootstrap:
            raise ConfigError("QUERYGATE_AUDIT_KAFKA_BOOTSTRAP is required with "
                              "QUERYGATE_CONSOLE_SOURCE=kafka")
        return KafkaIngester(pool, settings.audit_kafka_bootstrap, settings.audit_kafka_topic,
                             settings.console_ingest_batch, poll_s, **kafka_security(settings))
    return FileIngester(pool, audit_file(settings), settings.console_ingest_batch, poll_s)
