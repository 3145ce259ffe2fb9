"""The developer-side client of the gateway's sign-in protocol.

:mod:`authz.client.flow` speaks the portal's OAuth endpoints (RFC 8414 discovery, the RFC 8628
device flow, the refresh grant and RFC 7009 revocation) over httpx; :mod:`authz.client.tokenfile`
keeps the resulting tokens in a private file; :mod:`authz.client.setup` builds the Claude Code
settings that make ``authz token`` its ``apiKeyHelper``. The ``authz login``, ``authz token``,
``authz logout`` and ``authz setup`` commands in :mod:`authz.cli` tie them together.
"""
