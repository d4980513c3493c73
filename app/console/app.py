"""Entry points of ``querygate console``: serve the pages (app/console/web.py) or only fill
the index."""

from __future__ import annotations

from app.config import Settings
from app.console.ingest import FileIngester
from app.console.store import make_ingester, open_pool


async def run_ingest(settings: Settings, once: bool) -> None:
    """`querygate console ingest`: fill the index without serving pages."""
    pool = await open_pool(settings)
    try:
        ingester = make_ingester(settings, pool)
        if isinstance(ingester, FileIngester):
            await (ingester.run_once() if once else ingester.run())
        else:
            await ingester.run(once=once)
    finally:
        await pool.close()
