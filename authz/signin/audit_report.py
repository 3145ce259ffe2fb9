"""``authz audit``: the audit log (sign-ins, refreshes, revocations, back-channel logouts, admin
actions) for a human (table) or a script (JSON lines)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from authz.configtypes import GatewayConfig
from authz.store import sessions as store
from authz.store.migrate import open_migrated_pool
from authz.store.sessions import AuditEvent


def render_audit(events: Sequence[AuditEvent], fmt: str) -> str:
    """The events, oldest first, as a table or as JSON lines."""
    if fmt == "json":
        return "".join(
            json.dumps(
                {
                    "at": e.at.astimezone(UTC).isoformat(),
                    "kind": e.kind,
                    "outcome": e.outcome,
                    "reason": e.reason,
                    "email": e.email,
                    "session_id": e.session_id,
                    "client_ip": e.client_ip,
                    "user_agent": e.user_agent,
                    "detail": e.detail,
                },
                separators=(",", ":"),
            )
            + "\n"
            for e in events
        )
    lines = [f"{'at (UTC)':19}  {'kind':20} {'outcome':8} {'reason':24} {'email':28} {'client':15} detail"]
    for e in events:
        detail = json.dumps(e.detail, separators=(",", ":"), sort_keys=True) if e.detail else ""
        lines.append(
            f"{e.at.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {e.kind[:20]:20} {e.outcome[:8]:8} "
            f"{(e.reason or '-')[:24]:24} {(e.email or '-')[:28]:28} {(e.client_ip or '-')[:15]:15} "
            f"{detail[:120]}"
        )
    return "\n".join(lines) + "\n"


async def print_audit(
    config: GatewayConfig, *, since: datetime | None, kind: str | None, limit: int, fmt: str
) -> int:
    """Print the audit events at or after ``since`` (at most the newest ``limit``)."""
    pool = await open_migrated_pool(config.store, "audit events")
    try:
        events = await store.audit_since(pool, since, kind=kind, limit=limit)
    finally:
        await pool.close()
    print(render_audit(events, fmt), end="")
    return 0
