"""The portal: the sign-in pages and OAuth endpoints Envoy routes to .

* :func:`build_portal` (:mod:`authz.signin.portal.app`): the aiohttp application;
  :class:`PortalDeps` and the per-handler :class:`PortalContext` (:mod:`authz.signin.portal.context`);
  :mod:`authz.signin.portal.http`: form bodies, origins and OAuth JSON answers the handlers share.
* :mod:`authz.signin.portal.oauth`: RFC 8414 discovery, JWKS, RFC 8628 device authorization, the token
  endpoint, RFC 7009 revocation and OIDC Back-Channel Logout.
* :mod:`authz.signin.portal.web`: the verification page, the IdP callback and the approval.
* :mod:`authz.signin.portal.device` and :mod:`authz.signin.portal.pages`: pure helpers (codes,
  hashes, the rate limiter; HTML builders).
"""

from authz.signin.portal.app import PORTAL, build_portal
from authz.signin.portal.context import IdentityProvider, PortalContext, PortalDeps

__all__ = ["PORTAL", "IdentityProvider", "PortalContext", "PortalDeps", "build_portal"]
