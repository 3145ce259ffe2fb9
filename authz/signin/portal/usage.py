"""``GET /api/oauth/usage``: the bearer's spend and spend caps, as Claude Code reads them.

The bearer is a gateway access token, checked as ext_authz checks it (signature, expiry,
revocation: :meth:`PortalContext.bearer_claims`). The answer comes straight from PostgreSQL (the
spend counters and the caps set at run time) and the configuration, so every replica and
``authz spend show`` agree on it; its
``resets_at`` are the ``-reset`` instants of the standing headers (authz.billing.standing).
"""

from __future__ import annotations

import logging
from decimal import Decimal

from aiohttp import web

from authz.billing.caps import CapIndex, stored_limits, user_key
from authz.billing.periods import PERIODS, period_end, period_start
from authz.billing.standing import Standing, usage_document
from authz.configtypes import Period
from authz.errors import StoreError
from authz.identity import Caller
from authz.signin.portal.context import PortalContext
from authz.store.spend import Bucket, load_limits, spent_in

log = logging.getLogger("authz.signin.portal.usage")


class UsageEndpoint:
    """The handler, bound to the portal's context."""

    def __init__(self, context: PortalContext) -> None:
        self._context = context

    async def get(self, request: web.Request) -> web.Response:
        """Answer for the caller the bearer token names; 401 without a valid one."""
        claims = self._context.bearer_claims(request)
        if claims is None:
            # The Anthropic error envelope, as on the inference routes.
            error = {
                "type": "authentication_error",
                "message": "Send a valid gateway access token as a bearer.",
            }
            return web.json_response(
                {"type": "error", "error": error}, status=401, headers={"Cache-Control": "no-store"}
            )
        caller = Caller(sub=claims.sub, email=claims.email, groups=claims.groups, session_id=claims.sid)
        document = await self._document(caller)
        return web.json_response(document, headers={"Cache-Control": "no-store"})

    async def _document(self, caller: Caller) -> dict[str, object]:
        context = self._context
        config = context.config
        now = context.now()
        user = user_key(caller.email, caller.sub)
        policy = config.policy_for(caller.email, caller.groups)
        name = policy.name if policy is not None else None
        try:
            stored = stored_limits(await load_limits(context.pool))
            caps = CapIndex(config.policies, config.spend, stored).caps(name, user, caller.groups)
            buckets = {
                cap: Bucket(cap.scope, cap.name, cap.period, period_start(cap.period, now)) for cap in caps
            }
            own: dict[Period, Bucket] = {
                p: Bucket("user", user, p, period_start(p, now)) for p in PERIODS if user is not None
            }
            spent = await spent_in(context.pool, sorted({*buckets.values(), *own.values()}))
        except StoreError as exc:
            log.warning("usage for %s: %s", user, exc)
            caps = CapIndex(config.policies, config.spend, ()).caps(name, user, caller.groups)
            standings = [Standing(cap, Decimal(0), period_end(cap.period, now)) for cap in caps]
            return usage_document(standings, {}, fetch_error=True)
        standings = [Standing(cap, spent[b], period_end(cap.period, now)) for cap, b in buckets.items()]
        return usage_document(standings, {p: (spent[b], period_end(p, now)) for p, b in own.items()})
