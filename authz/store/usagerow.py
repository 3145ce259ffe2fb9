"""One usage row per inference request: the record the ledger writes to ``usage_events``.

Plain data with no database import, so the accounting code that builds rows stays pure. The JSON
form is what the local spool stores while PostgreSQL is unreachable; it round-trips exactly
(``Decimal`` as a string, ``datetime`` as ISO 8601 with its offset).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

# Fields added after the first release, with the value older spooled rows stand for.
_ADDED_FIELDS: dict[str, Any] = {
    "policy": None,
    "input_tokens_estimated": False,
    "recorded_by": "ext_proc",
    "service_identity": None,
    "reserved_usd": "0",
    "leases": [],
    "attempts": None,
}

# Who wrote a row. A refusal (ext_authz) or an exchange that saw its request end (ext_proc) is final;
# an exchange whose stream closed early (ext_proc_cut) and Envoy's access-log report of a request no
# final row was written for (access_log) are partial views of one request, merged by merge_rows.
FINAL_WRITERS = frozenset({"ext_authz", "ext_proc"})


@dataclass(frozen=True, slots=True)
class UsageRow:
    """What one request did, who made it, what it cost. One row per ``request_id``."""

    request_id: str
    started_at: datetime
    user_sub: str | None
    user_email: str | None
    groups: tuple[str, ...]
    session_id: str | None
    """The gateway session id (the token's ``sid``)."""
    cc_session_id: str | None
    """Claude Code's ``X-Claude-Code-Session-Id``."""
    agent_id: str | None
    parent_agent_id: str | None
    user_agent: str | None
    ingress_format: str
    """``bedrock``, ``vertex`` or ``messages``."""
    operation: str
    """``invoke``, ``stream``, ``count_tokens``, ``list_profiles``, ..."""
    upstream: str | None
    policy: str | None
    """The policy that admitted (or refused) the request."""
    requested_model: str | None
    upstream_model: str | None
    status: int
    """The HTTP status sent to the client."""
    outcome: str
    """``complete``, ``client_aborted``, ``upstream_error``, ``unmetered``, ``denied`` or ``error``."""
    reason: str | None
    input_tokens: int
    input_tokens_estimated: bool
    """The input count is an estimate from the request body size (no usage report arrived)."""
    output_tokens: int
    output_tokens_estimated: bool
    cache_write_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    cache_read_tokens: int
    cost_usd: Decimal
    latency_ms: float | None
    ttfb_ms: float | None
    recorded_by: str = "ext_proc"
    """``ext_authz``, ``ext_proc``, ``ext_proc_cut`` or ``access_log`` (see :func:`merge_rows`)."""
    service_identity: str | None = None
    """The service identity whose token made the request (``authz service-tokens``), else None."""
    reserved_usd: Decimal = Decimal(0)
    """What admission reserved for the request (its estimate) on each lease in ``leases``; the ledger
    takes it back off those leases when the row is written (authz.store.spend.settle)."""
    leases: tuple[str, ...] = ()
    attempts: int | None = None
    """How many upstream requests Envoy made for the request: 0 when it reached none (a refusal, an
    answer from the gateway itself), more than 1 when a failover chain's first upstreams failed
    before answering (``upstream`` is the one that answered, or failed last); None when unknown (a
    failover request cut off before any answer, rows written before this was recorded)."""

    def __post_init__(self) -> None:
        # A naive datetime would be read as local time by some consumers and as UTC by others;
        # refusing it here is cheaper than finding skewed rows in the dashboards later.
        if self.started_at.tzinfo is None or self.started_at.utcoffset() is None:
            raise ValueError("UsageRow.started_at must be timezone-aware (UTC)")

    def to_json(self) -> str:
        """One line of JSON (no newline) that :meth:`from_json` turns back into an equal row."""
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["groups"] = list(self.groups)
        data["cost_usd"] = str(self.cost_usd)
        data["reserved_usd"] = str(self.reserved_usd)
        data["leases"] = list(self.leases)
        # ASCII output: a lone surrogate in a header value is escaped instead of failing to encode.
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> UsageRow:
        """Parse :meth:`to_json` output; ``ValueError`` if it is not a complete, well-typed row."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"usage row is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("usage row is not a JSON object")
        names = {f.name for f in fields(cls)}
        # Spool segments written before these fields existed still replay (nothing is lost).
        for name, default in _ADDED_FIELDS.items():
            data.setdefault(name, default)
        if set(data) != names:
            missing = sorted(names - set(data))
            extra = sorted(set(data) - names)
            raise ValueError(f"usage row fields do not match: missing {missing}, unexpected {extra}")
        return cls(
            request_id=_str(data, "request_id"),
            started_at=_datetime(data, "started_at"),
            user_sub=_opt_str(data, "user_sub"),
            user_email=_opt_str(data, "user_email"),
            groups=_groups(data),
            session_id=_opt_str(data, "session_id"),
            cc_session_id=_opt_str(data, "cc_session_id"),
            agent_id=_opt_str(data, "agent_id"),
            parent_agent_id=_opt_str(data, "parent_agent_id"),
            user_agent=_opt_str(data, "user_agent"),
            ingress_format=_str(data, "ingress_format"),
            operation=_str(data, "operation"),
            upstream=_opt_str(data, "upstream"),
            policy=_opt_str(data, "policy"),
            requested_model=_opt_str(data, "requested_model"),
            upstream_model=_opt_str(data, "upstream_model"),
            status=_int(data, "status"),
            outcome=_str(data, "outcome"),
            reason=_opt_str(data, "reason"),
            input_tokens=_int(data, "input_tokens"),
            input_tokens_estimated=_bool(data, "input_tokens_estimated"),
            output_tokens=_int(data, "output_tokens"),
            output_tokens_estimated=_bool(data, "output_tokens_estimated"),
            cache_write_tokens=_int(data, "cache_write_tokens"),
            cache_write_5m_tokens=_int(data, "cache_write_5m_tokens"),
            cache_write_1h_tokens=_int(data, "cache_write_1h_tokens"),
            cache_read_tokens=_int(data, "cache_read_tokens"),
            cost_usd=_decimal(data, "cost_usd"),
            latency_ms=_opt_float(data, "latency_ms"),
            ttfb_ms=_opt_float(data, "ttfb_ms"),
            recorded_by=_str(data, "recorded_by"),
            service_identity=_opt_str(data, "service_identity"),
            reserved_usd=_decimal(data, "reserved_usd"),
            leases=_strings(data, "leases"),
            attempts=_opt_int(data, "attempts"),
        )


def _str(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ValueError(f"usage row field {key} must be a string")
    return value


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    return None if data[key] is None else _str(data, key)


def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    # bool is an int subclass: a true/false here would be a writer bug, not a count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"usage row field {key} must be an integer")
    return value


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    return None if data[key] is None else _int(data, key)


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data[key]
    if not isinstance(value, bool):
        raise ValueError(f"usage row field {key} must be a boolean")
    return value


def _opt_float(data: dict[str, Any], key: str) -> float | None:
    value = data[key]
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"usage row field {key} must be a number")
    return float(value)


def _decimal(data: dict[str, Any], key: str) -> Decimal:
    value = _str(data, key)
    try:
        return Decimal(value)
    except InvalidOperation as exc:
        raise ValueError(f"usage row field {key} is not a decimal: {value!r}") from exc


def _datetime(data: dict[str, Any], key: str) -> datetime:
    try:
        return datetime.fromisoformat(_str(data, key))
    except ValueError as exc:
        raise ValueError(f"usage row field {key} is not an ISO 8601 timestamp") from exc


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
        raise ValueError(f"usage row field {key} must be a list of strings")
    return tuple(value)


def _groups(data: dict[str, Any]) -> tuple[str, ...]:
    return _strings(data, "groups")


def merge_rows(existing: UsageRow, incoming: UsageRow) -> UsageRow:
    """The one row two reports of the same request become.

    A final row (a refusal, or an exchange that saw its request end) is never replaced, and
    replaces any partial row. Two partial reports merge: Envoy's access log knows how the request
    ended (its status, outcome and reason), the exchange what was counted before it did. The
    exchange's counts stand: every byte that reached the client passed its meter first (the filter
    is blocking), whereas the access log can only estimate from byte totals.
    """
    if existing.recorded_by in FINAL_WRITERS or existing == incoming:
        return existing
    if incoming.recorded_by in FINAL_WRITERS:
        return incoming
    log, cut = (existing, incoming) if existing.recorded_by == "access_log" else (incoming, existing)
    if log.recorded_by != "access_log" or cut.recorded_by != "ext_proc_cut":
        return existing  # two reports of one kind: the first stands
    return replace(
        cut,
        status=log.status,
        outcome=log.outcome,
        reason=log.reason,
        latency_ms=log.latency_ms if log.latency_ms is not None else cut.latency_ms,
        recorded_by="access_log",
        # Envoy counts the upstream attempts it made; the exchange of a failover request cut before
        # any answer never learnt them.
        attempts=log.attempts if log.attempts is not None else cut.attempts,
    )
