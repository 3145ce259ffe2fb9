"""Group policy: may this user call this model, and through which upstream. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from authz.billing.caps import policy_for
from authz.configtypes import GatewayConfig
from authz.identity import Caller
from backends.base import model_family
from backends.descriptor import PassThroughRoute
from backends.kinds import PASS_THROUGH

# Operations that name no billable model choice: listing profiles, and counting tokens (free on
# every upstream). They still need an upstream of the right kind to be answered.
_NO_MODEL_CHECK = frozenset({"list_profiles", "count_tokens"})


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The outcome: allowed or not, why not, which policy applied and which upstream to use."""

    allowed: bool
    reason: str | None
    policy: str | None
    upstream: str | None


def _model_allowed(patterns: tuple[str, ...], model: str) -> bool:
    # fnmatchcase, not fnmatch: fnmatch folds case by OS convention; we fold both sides ourselves.
    candidates = {model.lower(), model_family(model).lower()}
    return any(fnmatchcase(c, p.lower()) for p in patterns for c in candidates)


def decide(
    identity: Caller, route: PassThroughRoute, client_format: str, config: GatewayConfig
) -> PolicyDecision:
    """Apply the configured policies to one request.

    Precedence, deterministic and first-match:

    1. Policies are tried in file order. The first one that lists one of the user's groups (exact,
       case-sensitive IdP group names) or the user's email domain (case-insensitive, exact domain,
       no subdomains) applies; later policies are never consulted, even if the first denies.
       No matching policy: denied, "no policy admits this user".
    2. For invoke and stream, the canonical model id, or its family without the snapshot date,
       must match one of the policy's ``models`` glob patterns (case-insensitive); otherwise
       denied, "model X is not allowed for your groups". A token that carries its own model patterns
       (a service token created with ``--models``) must match those too: the allowed models are the
       intersection. ``list_profiles`` and ``count_tokens`` skip this check.
    3. The upstream is the first of the policy's ``upstreams`` whose kind serves the client
       format byte for byte; none: denied, "no upstream serves the <format> format for your policy".
    """
    policy = policy_for(config.policies, identity.groups, identity.email)
    if policy is None:
        return PolicyDecision(False, "no policy admits this user", None, None)

    if route.operation not in _NO_MODEL_CHECK:
        if route.model is None:
            return PolicyDecision(False, "the request names no model", policy.name, None)
        if not _model_allowed(policy.models, route.model.canonical):
            return PolicyDecision(
                False, f"model {route.model.canonical} is not allowed for your groups", policy.name, None
            )
        if identity.models is not None and not _model_allowed(identity.models, route.model.canonical):
            return PolicyDecision(
                False,
                f"model {route.model.canonical} is not allowed for this service token",
                policy.name,
                None,
            )

    serving = PASS_THROUGH.get(client_format)

    for name in policy.upstreams:
        try:
            upstream = config.upstream(name)
        except KeyError:
            # Config validation rejects unknown names; skipping keeps a bad reload fail-closed.
            continue
        if serving is not None and upstream.kind == serving.name:
            return PolicyDecision(True, None, policy.name, name)
    return PolicyDecision(
        False, f"no upstream serves the {client_format} format for your policy", policy.name, None
    )
