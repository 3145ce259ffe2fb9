"""The store layer: PostgreSQL access and the usage ledger. The only package that imports asyncpg.

* :class:`Ledger`: records usage rows off the hot path, spooling them while PostgreSQL is down.
* :class:`Spool`: the local JSON-lines spool the ledger falls back to.
* :func:`migrate`: applies the schema migrations under an advisory lock.
* :func:`connect_pool` / :func:`connect`: asyncpg connections with errors wrapped in StoreError.
* :func:`recent_usage`: the newest usage rows, for ``authz usage``.
* :class:`EmbeddedPostgres`: a throwaway server for ``make run`` and the tests.
"""

from authz.store.db import Connection, Pool, connect, connect_pool, redact_url
from authz.store.embedded import EmbeddedPostgres
from authz.store.ledger import Ledger
from authz.store.migrate import migrate
from authz.store.queries import recent_usage
from authz.store.spool import Spool

__all__ = [
    "Connection",
    "EmbeddedPostgres",
    "Ledger",
    "Pool",
    "Spool",
    "connect",
    "connect_pool",
    "migrate",
    "recent_usage",
    "redact_url",
]
