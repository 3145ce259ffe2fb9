"""``authz spend-limits set|list|delete`` and ``authz spend show``: caps changed at run time, and
where a user stands.

Caps set here live in ``spend_limits``; every worker reads them at its next sync
(``spend.sync_interval`` seconds), no restart needed. Each change is audited (``spend_limit_set``,
``spend_limit_delete``) with the operating-system user who made it and the old and new amounts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from authz.billing.caps import ORG, CapIndex, LimitScope, dollars, stored_limits, user_key
from authz.billing.periods import PERIODS, period_end, period_start
from authz.billing.standing import Standing
from authz.configtypes import GatewayConfig, Period
from authz.errors import GatewayError
from authz.store.db import Pool
from authz.store.migrate import open_migrated_pool
from authz.store.sessions.audit_log import operator
from authz.store.spend import Bucket, delete_limit, load_limits, set_limit, spent_in, user_groups


def _user(user: str) -> str:
    # An e-mail names a person (kept lower-cased, as ext_authz keys it); anything else is a service
    # identity's subject, kept as is (authz.billing.caps.user_key).
    user = user.strip()
    return user_key(user, None) or "" if "@" in user else user


def scope_of(*, user: str | None, group: str | None, pooled: bool, org: bool) -> tuple[LimitScope, str]:
    """The ``spend_limits`` scope and name the command-line options name."""
    if user is not None:
        return "user", _user(user)
    if group is not None:
        return ("group_pool" if pooled else "group"), group.strip()
    if org:
        return "org", ORG
    raise GatewayError("name what the cap applies to: --user EMAIL, --group G [--pooled] or --org")


def parse_usd(text: str) -> Decimal:
    """A dollar amount from the command line: a finite, non-negative number."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise GatewayError(f"--usd {text!r} is not a number") from None
    if not value.is_finite() or value < 0:
        raise GatewayError(f"--usd {text!r} must be a non-negative amount in dollars")
    return value


async def set_command(
    config: GatewayConfig, scope: LimitScope, name: str, period: Period, usd: Decimal
) -> int:
    """Create or replace one cap; print the change."""
    pool = await open_migrated_pool(config.store, "spend limits")
    try:
        old = await set_limit(pool, scope=scope, name=name, period=period, usd=usd, by=operator())
    finally:
        await pool.close()
    before = "none" if old is None else f"${dollars(old)}"
    print(
        f"{scope} {name} {period}: {before} -> ${dollars(usd)} "
        f"(workers apply it within {config.spend.sync_interval:g} s)"
    )
    return 0


async def delete_command(config: GatewayConfig, scope: LimitScope, name: str, period: Period) -> int:
    """Delete one cap; exit status 1 when there was none."""
    pool = await open_migrated_pool(config.store, "spend limits")
    try:
        old = await delete_limit(pool, scope=scope, name=name, period=period, by=operator())
    finally:
        await pool.close()
    if old is None:
        print(f"authz: no {period} spend limit for {scope} {name}", file=sys.stderr)
        return 1
    print(f"{scope} {name} {period}: ${dollars(old)} -> none")
    return 0


async def list_command(config: GatewayConfig, *, as_json: bool) -> int:
    """Print every cap set at run time (the file's caps are in the file)."""
    pool = await open_migrated_pool(config.store, "spend limits")
    try:
        limits = await load_limits(pool)
    finally:
        await pool.close()
    if as_json:
        for limit in limits:
            print(
                json.dumps(
                    {
                        "scope": limit.scope,
                        "name": limit.name,
                        "period": limit.period,
                        "usd": str(limit.usd),
                        "updated_at": limit.updated_at.isoformat(),
                        "updated_by": limit.updated_by,
                    }
                )
            )
        return 0
    if not limits:
        print("No spend limits set with authz spend-limits (caps in the config file still apply).")
        return 0
    rows = [("scope", "name", "period", "usd", "updated (UTC)", "by")]
    rows += [
        (
            lim.scope,
            lim.name,
            lim.period,
            f"${dollars(lim.usd)}",
            lim.updated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            lim.updated_by or "-",
        )
        for lim in limits
    ]
    print(_table(rows))
    return 0


async def standing_of(
    pool: Pool, config: GatewayConfig, user: str, groups: Sequence[str] | None, now: datetime
) -> dict[str, Any]:
    """A user's spend per period and every cap on it, with what remains (``authz spend show``)."""
    key = _user(user)
    if groups is None:
        groups = await user_groups(pool, key) or ()
    policy = config.policy_for(user if "@" in user else "", groups)
    index = CapIndex(config.policies, config.spend, stored_limits(await load_limits(pool)))
    caps = index.caps(policy.name if policy else None, key, groups)
    own = {p: Bucket("user", key, p, period_start(p, now)) for p in PERIODS}
    buckets = {cap: Bucket(cap.scope, cap.name, cap.period, period_start(cap.period, now)) for cap in caps}
    spent = await spent_in(pool, sorted({*own.values(), *buckets.values()}))
    standings = [Standing(cap, spent[b], period_end(cap.period, now)) for cap, b in buckets.items()]
    return {
        "user": key,
        "groups": list(groups),
        "policy": policy.name if policy else None,
        "spent": {
            p: {"usd": str(spent[b]), "resets_at": period_end(p, now).isoformat()} for p, b in own.items()
        },
        "caps": [
            {
                "scope": s.cap.scope,
                "name": s.cap.name,
                "period": s.cap.period,
                "usd": str(s.cap.usd),
                "spent": str(s.spent),
                "remaining": str(s.remaining),
                "resets_at": s.reset.isoformat(),
                "source": s.cap.source,
            }
            for s in standings
        ],
    }


async def show_command(
    config: GatewayConfig,
    user: str,
    groups: Sequence[str] | None,
    *,
    as_json: bool,
    now: datetime | None = None,
) -> int:
    """Print a user's spend per period and what remains of each cap."""
    pool = await open_migrated_pool(config.store, "spend limits")
    try:
        report = await standing_of(pool, config, user, groups, now or datetime.now(UTC))
    finally:
        await pool.close()
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    groups_text = ", ".join(report["groups"]) or "none known"
    print(f"Spend of {report['user']} (groups: {groups_text}; policy: {report['policy'] or 'none'})")
    rows: list[tuple[str, ...]] = [("period", "spent", "resets (UTC)")]
    rows += [(p, f"${Decimal(v['usd']):.2f}", _when(v["resets_at"])) for p, v in report["spent"].items()]
    print(_table(rows))
    if not report["caps"]:
        print("\nNo spend cap applies.")
        return 0
    print("\nCaps (every one applies; the tightest blocks):")
    rows = [("scope", "period", "cap", "spent", "remaining", "resets (UTC)", "set by")]
    for cap in report["caps"]:
        scope = cap["scope"] if cap["scope"] != "group_pool" else f"group_pool {cap['name']}"
        rows.append(
            (
                scope,
                cap["period"],
                f"${dollars(Decimal(cap['usd']))}",
                f"${Decimal(cap['spent']):.2f}",
                f"${Decimal(cap['remaining']):.2f}",
                _when(cap["resets_at"]),
                cap["source"],
            )
        )
    print(_table(rows))
    return 0


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
