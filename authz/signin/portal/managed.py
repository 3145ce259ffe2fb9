"""``GET /managed/settings``: the Claude Code managed-settings document of the caller's policy.

Claude Code signed in to the gateway (``/login``, "Cloud gateway") asks for this about once an
hour with its gateway token (code.claude.com/docs/en/llm-gateway-protocol, "Managed settings"):

* the token is judged as ext_authz judges it (the same header rules, verifier and revocation set),
  and a bad one gets 401 ``authentication_error`` in the Anthropic envelope;
* the policy is the one inference uses (:meth:`GatewayConfig.policy_for`, the first match);
  with no policy, or a policy without ``managed_settings``, the answer is 404 ("no managed
  policy"); an empty mapping is 200 with ``{}`` ("an empty policy"), which is not the same;
* 200 carries ``{"uuid", "checksum", "settings"}``; ``checksum`` is ``sha256:`` + the hex SHA-256
  of the canonical settings text (:mod:`authz.jsondoc`, the value the client computes itself), and
  quoted it is the ``ETag``; the ``settings`` in the body are that canonical text, byte for byte;
* 304 only when ``If-None-Match`` names that ETag; ``If-None-Match: *`` is a probe from a Claude
  Desktop session that reads no body, answered as if the header were absent.

The documents are derived once per configuration (again after a reload); a request costs a token
check and a hash lookup, no database round trip.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from authz.configtypes import GatewayConfig, Policy
from authz.errors import TokenError
from authz.signin.portal.http import anthropic_error
from authz.signin.tokens import Claims

if TYPE_CHECKING:
    from authz.signin.portal.context import PortalContext

MANAGED_SETTINGS_PATH = "/managed/settings"

# uuid5 namespace of the documents' ids: the same policy with the same settings keeps its id on
# every replica and across restarts, and a change to either gives a new one.
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:claude-gateway:managed-settings")

# The settings are per user and change when the configuration does: a cache may keep them only
# for this user, and must ask again (with If-None-Match) before reusing them.
_CACHE_CONTROL = "private, no-cache"

_TOKEN_MESSAGES = {
    "missing": "Missing gateway access token. Sign in to the gateway (/login in Claude Code).",
    "expired": "The gateway access token has expired. Sign in again or refresh it.",
    "revoked": "The gateway session was revoked. Sign in again.",
    "ambiguous": "Send exactly one gateway access token (one Authorization: Bearer header or x-api-key).",
}


@dataclass(frozen=True, slots=True)
class ManagedDocument:
    """One policy's answer: its id, checksum, ETag and the whole 200 body."""

    uuid: str
    checksum: str
    etag: str
    body: bytes


def managed_document(policy: Policy) -> ManagedDocument | None:
    """The document a policy serves, None when it has no ``managed_settings``."""
    settings = policy.managed_settings
    if settings is None:
        return None
    checksum = settings.checksum
    doc_id = str(uuid.uuid5(_UUID_NAMESPACE, f"{policy.name}\n{checksum}"))
    # Written by hand so that `settings` is the canonical text the checksum covers.
    body = (
        f'{{"uuid":{json.dumps(doc_id)},"checksum":{json.dumps(checksum)},"settings":{settings.canonical}}}'
    )
    return ManagedDocument(uuid=doc_id, checksum=checksum, etag=f'"{checksum}"', body=body.encode("utf-8"))


def if_none_match_hits(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` value names ``etag`` (RFC 9110 §13.1.2, weak comparison).

    ``*`` does not count: Claude Code sends it as a probe that must be answered as if there were
    no header (a 304 it did not ask for is a failed fetch for the client).
    """
    if header is None:
        return False
    wanted = etag.removeprefix("W/")
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag.removeprefix("W/") == wanted:
            return True
    return False


class ManagedSettingsEndpoint:
    """The handler; the documents are computed once per configuration."""

    def __init__(self, ctx: PortalContext) -> None:
        self._ctx = ctx
        self._documents: tuple[GatewayConfig, dict[Policy, ManagedDocument | None]] | None = None

    def _documents_of(self, config: GatewayConfig) -> dict[Policy, ManagedDocument | None]:
        """Each policy's document in ``config``, computed at the first request under it."""
        cached = self._documents
        if cached is None or cached[0] is not config:
            cached = self._documents = (config, {p: managed_document(p) for p in config.policies})
        return cached[1]

    async def get(self, request: web.Request) -> web.Response:
        """Answer one poll (module docstring)."""
        try:
            claims = self._claims(request)
        except TokenError as exc:
            message = _TOKEN_MESSAGES.get(exc.reason, "The gateway access token is not valid.")
            # As ext_authz: retrying with the same token cannot help.
            return anthropic_error(401, "authentication_error", message, should_retry=False)
        config = self._ctx.config  # one configuration for the whole answer, whatever a reload does
        policy = config.policy_for(claims.email, claims.groups)
        document = self._documents_of(config).get(policy) if policy is not None else None
        if document is None:
            message = (
                "No policy of this gateway admits your account."
                if policy is None
                else "Your policy has no managed settings."
            )
            return anthropic_error(404, "not_found_error", message)
        headers = {"ETag": document.etag, "Cache-Control": _CACHE_CONTROL}
        if if_none_match_hits(request.headers.get("If-None-Match"), document.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=document.body, content_type="application/json", headers=headers)

    def _claims(self, request: web.Request) -> Claims:
        """The verified, unrevoked token's claims; TokenError otherwise (the rules of ext_authz)."""
        return self._ctx.token_claims(request, self._ctx.now().timestamp())
