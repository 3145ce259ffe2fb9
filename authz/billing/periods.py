"""Spend-cap periods: the UTC day, the week from Monday 00:00 UTC, the UTC month. Pure.

A request counts in the period its admission fell in (the row's ``started_at``), so a request
admitted at 23:59:59 and answered after midnight is yesterday's spend, and the reservation made for
it at admission is settled against the same period.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from authz.configtypes import Period

PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly")


def period_start(period: Period, at: datetime) -> datetime:
    """The first instant (UTC) of the ``period`` that contains ``at`` (an aware datetime)."""
    at = at.astimezone(UTC)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=day.weekday())  # Monday is weekday 0 (ISO 8601 weeks)
    return day.replace(day=1)


def period_end(period: Period, at: datetime) -> datetime:
    """The first instant after the ``period`` containing ``at``: when its cap resets."""
    start = period_start(period, at)
    if period == "daily":
        return start + timedelta(days=1)
    if period == "weekly":
        return start + timedelta(days=7)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


class PeriodClock:
    """Period starts and ends for a timestamp, cached for the current UTC day (the hot path asks for
    the same three periods request after request)."""

    __slots__ = ("_bounds", "_day", "_day_end")

    def __init__(self) -> None:
        self._day = 0.0
        self._day_end = 0.0
        self._bounds: dict[Period, tuple[datetime, datetime]] = {}

    def bounds(self, period: Period, now: float) -> tuple[datetime, datetime]:
        """``(start, end)`` of the ``period`` containing the Unix time ``now``."""
        if not self._day <= now < self._day_end:
            at = datetime.fromtimestamp(now, tz=UTC)
            day = period_start("daily", at)
            self._day = day.timestamp()
            self._day_end = self._day + 86400.0
            self._bounds = {p: (period_start(p, at), period_end(p, at)) for p in PERIODS}
        return self._bounds[period]
