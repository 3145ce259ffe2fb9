"""``authz usage``: recent usage rows for a human or a script."""

from __future__ import annotations

from authz.configtypes import GatewayConfig
from authz.store.db import connect_pool
from authz.store.migrate import migrate
from authz.store.queries import recent_usage


async def print_recent(config: GatewayConfig, *, limit: int, as_json: bool) -> int:
    """Print the ``limit`` most recent rows, newest first."""
    pool = await connect_pool(config.store.url, timeout=config.store.connect_timeout)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        rows = await recent_usage(pool, limit=limit)
    finally:
        await pool.close()
    if as_json:
        for row in rows:
            print(row.to_json())
        return 0
    header = (
        f"{'started (UTC)':19}  {'user':24} {'model':34} {'status':>6} {'outcome':15} "
        f"{'in':>7} {'out':>7} {'cache w':>7} {'cache r':>7} {'cost USD':>11}"
    )
    print(header)
    for r in rows:
        print(
            f"{r.started_at:%Y-%m-%d %H:%M:%S}  {(r.user_email or '-')[:24]:24} "
            f"{(r.requested_model or '-')[:34]:34} "
            f"{r.status:>6} {r.outcome[:15]:15} {r.input_tokens:>7} {r.output_tokens:>7} "
            f"{r.cache_write_tokens:>7} {r.cache_read_tokens:>7} {r.cost_usd:>11.6f}"
        )
    return 0
