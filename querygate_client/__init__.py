"""A typed Python client of the querygate gateway (sync and async, over httpx).

A package of its own, beside the gateway's ``app``: ``import querygate_client`` never
clashes with an application's own ``app`` package (docs/agents.md).
"""

from querygate_client import errors
from querygate_client._core import BearerAuth, TokenFile
from querygate_client.client import AsyncClient, AsyncRowIterator, Client, RowIterator
from querygate_client.errors import QuerygateError
from querygate_client.models import (
    Approval,
    ApprovalPending,
    Catalog,
    CatalogTable,
    Column,
    Explanation,
    QueryResult,
)

__all__ = [
    "Approval",
    "ApprovalPending",
    "AsyncClient",
    "AsyncRowIterator",
    "BearerAuth",
    "Catalog",
    "CatalogTable",
    "Client",
    "Column",
    "Explanation",
    "QueryResult",
    "QuerygateError",
    "RowIterator",
    "TokenFile",
    "errors",
]
