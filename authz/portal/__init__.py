"""The portal: the sign-in pages and OAuth endpoints Envoy routes to (issue 3, scope 2).

* :func:`build_portal` / :class:`PortalDeps` (:mod:`authz.portal.app`): the aiohttp application.
* :mod:`authz.portal.oauth`: RFC 8414 discovery, JWKS, RFC 8628 device authorization, the token
  endpoint, RFC 7009 revocation and OIDC Back-Channel Logout.
* :mod:`authz.portal.web`: the verification page, the IdP callback and the approval.
* :mod:`authz.portal.device` and :mod:`authz.portal.pages`: pure helpers (codes, hashes, the rate
  limiter; HTML builders).
"""

from authz.portal.app import IdentityProvider, PortalDeps, build_portal

__all__ = ["IdentityProvider", "PortalDeps", "build_portal"]
