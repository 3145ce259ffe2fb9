"""Which spend caps apply to a caller. Pure.

Caps come from three places: the policy that admits the user (``policies[].spend_caps``, each
member capped on their own), the file's ``spend`` section (``group_budgets`` shared by a group's
members, ``org_caps`` for everyone's spend together), and the ``spend_limits`` table that
``authz spend-limits`` edits at run time (a user, each member of a group, a group's shared budget,
the organisation).

Precedence: every applicable cap applies and the tightest blocks. Caps on the same spend (the same
scope and period: the user's own daily spend, say) merge into the smallest; caps on different
spend (the user's daily spend and the group's shared monthly budget) are all checked, and a request
is admitted only when every one of them has room for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, cast

from authz.configtypes import Period, Policy, Spend
from authz.store.spend import LimitRecord

# The spend a cap applies to: one user's, one group's members' together, or everyone's.
ScopeKind = Literal["user", "group_pool", "org"]
# How ``authz spend-limits`` names a cap: ``group`` caps each member (their own spend, scope user).
LimitScope = Literal["user", "group", "group_pool", "org"]
LIMIT_SCOPES: tuple[LimitScope, ...] = ("user", "group", "group_pool", "org")
ORG = "*"


def dollars(usd: Decimal) -> str:
    """An amount as people read it: to the cent (``5.00``), or in full when it has more (``0.012``)."""
    cents = usd.quantize(Decimal("0.01"))
    return str(cents) if cents == usd else f"{usd.normalize():f}"


def user_key(email: str | None, sub: str | None) -> str | None:
    """The name a user's spend is kept under: the e-mail, lower-cased, or for a service identity
    (whose tokens carry no e-mail) its subject."""
    if email:
        return email.lower()
    return sub or None


@dataclass(frozen=True, slots=True)
class StoredLimit:
    """One cap set with ``authz spend-limits`` (a row of ``spend_limits``)."""

    scope: LimitScope
    name: str
    period: Period
    usd: Decimal
    updated_at: datetime | None = None
    updated_by: str | None = None


def stored_limits(records: Iterable[LimitRecord]) -> tuple[StoredLimit, ...]:
    """The ``spend_limits`` rows as :class:`StoredLimit` (the table's CHECK keeps scopes valid)."""
    return tuple(
        StoredLimit(cast(LimitScope, r.scope), r.name, r.period, r.usd, r.updated_at, r.updated_by)
        for r in records
    )


@dataclass(frozen=True, slots=True)
class Cap:
    """One cap that applies to a request: at most ``usd`` of the ``scope``'s spend named ``name`` per
    ``period``. ``source`` says where the tightest value came from."""

    scope: ScopeKind
    name: str
    period: Period
    usd: Decimal
    source: str

    @property
    def label(self) -> str:
        """How a refusal and a denied row name the cap: ``user daily 5.00 USD``."""
        who = {"user": "user", "group_pool": f"group_pool {self.name}", "org": "org"}[self.scope]
        return f"{who} {self.period} {dollars(self.usd)} USD"


def _usd(value: float) -> Decimal:
    # Through str, as prices are: Decimal(0.1) would carry the binary float's error into the cap.
    return Decimal(str(value))


class CapIndex:
    """The caps of the configuration and the ``spend_limits`` table, indexed for one lookup per
    request. Rebuilt when either changes."""

    __slots__ = ("_group", "_org", "_policies", "_pool", "_user", "pooled_groups")

    def __init__(self, policies: Sequence[Policy], spend: Spend, stored: Iterable[StoredLimit]) -> None:
        self._policies = {
            p.name: tuple((c.period, _usd(c.usd)) for c in p.spend_caps) for p in policies if p.spend_caps
        }
        self._user: dict[str, list[tuple[Period, Decimal, str]]] = {}
        self._group: dict[str, list[tuple[Period, Decimal, str]]] = {}
        self._pool: dict[str, list[tuple[Period, Decimal, str]]] = {}
        self._org: list[tuple[Period, Decimal, str]] = [
            (c.period, _usd(c.usd), "spend.org_caps") for c in spend.org_caps
        ]
        for budget in spend.group_budgets:
            self._pool.setdefault(budget.group, []).append(
                (budget.period, _usd(budget.usd), "spend.group_budgets")
            )
        tables = {"user": self._user, "group": self._group, "group_pool": self._pool}
        for limit in stored:
            entry = (limit.period, limit.usd, f"spend-limits {limit.scope}")
            if limit.scope == "org":
                self._org.append(entry)
            else:
                tables[limit.scope].setdefault(limit.name, []).append(entry)
        # Groups whose members' spend is counted together (the ledger keeps a counter for each).
        self.pooled_groups = frozenset(self._pool)

    def caps(self, policy: str | None, user: str | None, groups: Sequence[str]) -> tuple[Cap, ...]:
        """Every cap on the caller's spend, one per (scope, name, period), the tightest value each."""
        merged: dict[tuple[ScopeKind, str, Period], Cap] = {}

        def add(scope: ScopeKind, name: str, entries: Iterable[tuple[Period, Decimal, str]]) -> None:
            for period, usd, source in entries:
                key = (scope, name, period)
                seen = merged.get(key)
                if seen is None or usd < seen.usd:
                    merged[key] = Cap(scope, name, period, usd, source)

        if user is not None:
            if policy is not None and (own := self._policies.get(policy)):
                add("user", user, ((p, u, f"policy {policy}") for p, u in own))
            if self._user and (entries := self._user.get(user)):
                add("user", user, entries)
            if self._group:
                for group in groups:
                    if entries := self._group.get(group):
                        add("user", user, entries)
        if self._pool:
            for group in groups:
                if entries := self._pool.get(group):
                    add("group_pool", group, entries)
        if self._org:
            add("org", ORG, self._org)
        return tuple(merged[k] for k in sorted(merged))
