"""Pure HTML builders for the admin page: spend over time as a server-rendered SVG chart, top users,
models and refusal reasons for a period, and a link to the CSV. No scripts, nothing loaded from
anywhere (the portal's Content-Security-Policy allows neither); every value is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from html import escape
from urllib.parse import urlencode

from authz.store.reports import Denials, UsageSummary

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0}
body{background:#f6f6f4;color:#1f1f1f}
main{max-width:64rem;margin:2rem auto;padding:2rem;background:#fff;border:1px solid #ddd;border-radius:8px}
h1{font-size:1.4rem;margin-top:0}h2{font-size:1.1rem;margin:1.8rem 0 .6rem}
form{display:flex;gap:1rem;align-items:end;flex-wrap:wrap}label{display:block;font-weight:600;font-size:.9rem}
button{font-size:1rem;padding:.35rem 1rem;cursor:pointer}
.totals{display:flex;gap:2rem;flex-wrap:wrap;margin:1.2rem 0}.totals div{min-width:9rem}
.totals strong{display:block;font-size:1.5rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:2rem}
.error{color:#a40000;border-left:4px solid #a40000;padding-left:.6rem}
""".strip()

CHART_WIDTH = 880
CHART_HEIGHT = 240
_MARGIN_LEFT, _MARGIN_BOTTOM, _MARGIN_TOP = 64, 36, 12


@dataclass(frozen=True, slots=True)
class Period:
    """The days shown: ``start`` to ``end`` inclusive (UTC)."""

    start: date
    end: date

    def query(self, **extra: str) -> str:
        """The query string that selects this period."""
        return urlencode({"from": self.start.isoformat(), "to": self.end.isoformat(), **extra})


@dataclass(frozen=True, slots=True)
class Report:
    """Everything the admin page shows for a period."""

    period: Period
    days: Sequence[UsageSummary]
    users: Sequence[UsageSummary]
    models: Sequence[UsageSummary]
    denials: Sequence[Denials]


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def money(value: Decimal) -> str:
    """USD with cents, or more digits below one cent so small spend is not shown as zero."""
    if value and abs(value) < Decimal("0.01"):
        return f"${value:.6f}"
    return f"${value:,.2f}"


def layout(title: str, body: str) -> str:
    """A page of the admin area."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        f"<title>{_e(title)} · Claude gateway</title>"
        f"<style>{_STYLE}</style></head>"
        f"<body><main><h1>{_e(title)}</h1>{body}</main></body></html>\n"
    )


def spend_chart(period: Period, days: Sequence[UsageSummary]) -> str:
    """Spend per day as an SVG bar chart, every day of the period present (days without spend at 0)."""
    by_day = {d.key: d.cost_usd for d in days}
    span = (period.end - period.start).days + 1
    series = [(period.start.fromordinal(period.start.toordinal() + i)) for i in range(span)]
    values = [by_day.get(day.isoformat(), Decimal(0)) for day in series]
    top = max(values, default=Decimal(0)) or Decimal(1)
    plot_w = CHART_WIDTH - _MARGIN_LEFT - 8
    plot_h = CHART_HEIGHT - _MARGIN_BOTTOM - _MARGIN_TOP
    step = plot_w / max(1, span)
    bar = max(1.0, step * 0.8)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="spend-chart" role="img" width="{CHART_WIDTH}" '
        f'height="{CHART_HEIGHT}" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
        f'aria-label="Spend per day from {period.start} to {period.end}">',
        f'<line x1="{_MARGIN_LEFT}" y1="{_MARGIN_TOP + plot_h}" x2="{CHART_WIDTH - 8}" '
        f'y2="{_MARGIN_TOP + plot_h}" stroke="#999"/>',
    ]
    for fraction in (Decimal(0), Decimal("0.5"), Decimal(1)):
        y = _MARGIN_TOP + plot_h - float(fraction) * plot_h
        parts.append(
            f'<text x="{_MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#555">'
            f"{_e(money(top * fraction))}</text>"
        )
    label_every = max(1, span // 10)
    for i, (day, value) in enumerate(zip(series, values, strict=True)):
        height = float(value / top) * plot_h
        x = _MARGIN_LEFT + i * step + (step - bar) / 2
        parts.append(
            f'<rect class="bar" data-day="{day.isoformat()}" data-usd="{value}" x="{x:.1f}" '
            f'y="{_MARGIN_TOP + plot_h - height:.1f}" width="{bar:.1f}" height="{height:.1f}" fill="#c96442">'
            f"<title>{day.isoformat()}: {_e(money(value))}</title></rect>"
        )
        if i % label_every == 0:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{CHART_HEIGHT - 14}" text-anchor="middle" font-size="11" '
                f'fill="#555">{day:%m-%d}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _table(table_id: str, key: str, rows: Sequence[UsageSummary]) -> str:
    body = "".join(
        f"<tr><td>{_e(r.key or '-')}</td><td class='n'>{r.requests}</td>"
        f"<td class='n'>{r.input_tokens + r.cache_write_tokens + r.cache_read_tokens}</td>"
        f"<td class='n'>{r.output_tokens}</td><td class='n'>{r.denials}</td>"
        f"<td class='n' data-usd='{r.cost_usd}'>{_e(money(r.cost_usd))}</td></tr>"
        for r in rows
    )
    return (
        f'<table id="{table_id}"><thead><tr><th>{_e(key)}</th><th class="n">requests</th>'
        '<th class="n">input tokens</th><th class="n">output tokens</th><th class="n">denied</th>'
        f'<th class="n">spend</th></tr></thead><tbody>{body or _NONE.format(6)}</tbody></table>'
    )


_NONE = "<tr><td colspan={}>None</td></tr>"


def dashboard_page(report: Report, *, signed_in_as: str) -> str:
    """The admin page for one period."""
    period = report.period
    total_cost = sum((d.cost_usd for d in report.days), Decimal(0))
    total_requests = sum(d.requests for d in report.days)
    total_denied = sum(d.denials for d in report.days)
    total_tokens = sum(
        d.input_tokens + d.output_tokens + d.cache_write_tokens + d.cache_read_tokens for d in report.days
    )
    denials = (
        "".join(f"<tr><td>{_e(d.reason)}</td><td class='n'>{d.requests}</td></tr>" for d in report.denials)
        or "<tr><td colspan=2>None</td></tr>"
    )
    body = (
        f"<p>Signed in as <strong>{_e(signed_in_as)}</strong>. Times are UTC.</p>"
        '<form method="get" action="/admin">'
        '<div><label for="from">From</label>'
        f'<input type="date" id="from" name="from" value="{period.start}"></div>'
        f'<div><label for="to">To</label><input type="date" id="to" name="to" value="{period.end}"></div>'
        '<button type="submit">Show</button>'
        f'<a href="/admin/usage.csv?{_e(period.query(by="user"))}" id="csv">Download CSV (by user)</a>'
        "</form>"
        '<div class="totals">'
        f'<div>Spend<strong id="total-spend" data-usd="{total_cost}">{_e(money(total_cost))}</strong></div>'
        f'<div>Requests<strong id="total-requests">{total_requests}</strong></div>'
        f'<div>Tokens<strong id="total-tokens">{total_tokens}</strong></div>'
        f'<div>Denied<strong id="total-denied">{total_denied}</strong></div>'
        "</div>"
        f"<h2>Spend per day</h2>{spend_chart(period, report.days)}"
        f"<h2>Top users</h2>{_table('top-users', 'user', report.users)}"
        '<div class="cols">'
        f"<div><h2>Top models</h2>{_table('top-models', 'model', report.models)}</div>"
        '<div><h2>Refusals by reason</h2><table id="denials"><thead><tr><th>reason</th>'
        f'<th class="n">requests</th></tr></thead><tbody>{denials}</tbody></table></div>'
        "</div>"
    )
    return layout("Gateway usage", body)


def message_page(title: str, message: str) -> str:
    """A refusal or failure in the admin area."""
    return layout(title, f'<p class="error" role="alert">{_e(message)}</p>')
