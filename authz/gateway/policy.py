"""Group policy: may this user call this model, and through which upstream. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from authz.configtypes import GatewayConfig, Policy
from authz.envoy.failover import servable
from authz.identity import Caller
from authz.translate.messages import FORMAT as MESSAGES
from backends.base import model_family
from backends.descriptor import PassThroughRoute

# Operations that name no billable model choice: listing profiles and models, and counting tokens
# (free on every upstream). They still need an upstream of the right kind to be answered.
_NO_MODEL_CHECK = frozenset({"list_profiles", "list_models", "count_tokens"})


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The outcome: allowed or not, why not, which policy applied and which upstream to use;
    ``upstreams`` are the ones the request may be tried on in order (its failover chain, the first
    being ``upstream``)."""

    allowed: bool
    reason: str | None
    policy: str | None
    upstream: str | None
    upstreams: tuple[str, ...] = ()


def _model_allowed(patterns: tuple[str, ...], model: str) -> bool:
    # fnmatchcase, not fnmatch: fnmatch folds case by OS convention; we fold both sides ourselves.
    candidates = {model.lower(), model_family(model).lower()}
    return any(fnmatchcase(c, p.lower()) for p in patterns for c in candidates)


def check_model(policy: Policy, token_models: tuple[str, ...] | None, canonical: str) -> str | None:
    """Why ``policy`` (and the token's own patterns, if any) refuses the canonical model id, or None
    when it may be used. The one model check, for ext_authz (a model in the path) and the exchange
    (a model in a Messages body)."""
    if not _model_allowed(policy.models, canonical):
        return f"model {canonical} is not allowed for your groups"
    if token_models is not None and not _model_allowed(token_models, canonical):
        return f"model {canonical} is not allowed for this service token"
    return None


def decide(
    identity: Caller, route: PassThroughRoute, client_format: str, config: GatewayConfig
) -> PolicyDecision:
    """Apply the configured policies to one request.

    Precedence, deterministic and first-match:

    1. Policies are tried in file order. The first one that lists one of the user's groups (exact,
       case-sensitive IdP group names) or the user's email domain (case-insensitive, exact domain,
       no subdomains) applies (:meth:`GatewayConfig.policy_for`, which the managed settings use
       too); later policies are never consulted, even if the first denies.
       No matching policy: denied, "no policy admits this user".
    2. For invoke and stream, the canonical model id, or its family without the snapshot date,
       must match one of the policy's ``models`` glob patterns (case-insensitive); otherwise
       denied, "model X is not allowed for your groups". A token that carries its own model patterns
       (a service token created with ``--models``) must match those too: the allowed models are the
       intersection. ``list_profiles`` and ``count_tokens`` skip this check. A Messages-format
       request names its model in the body: the exchange applies the same check
       (:func:`check_model`) when the body arrives, before anything is sent upstream.
    3. The upstream is the first of the policy's ``upstreams`` that serves the client format:
       for the Bedrock and Vertex formats the first of that kind, for the Messages format the
       first of any kind; none: denied, "no upstream serves the <format> format for your policy".
       The others that serve it, in the policy's order and up to ``failover.max_attempts`` in
       all, are where the request is retried if that one fails before answering
       (:mod:`authz.envoy.failover`).
    """
    policy = config.policy_for(identity.email, identity.groups)
    if policy is None:
        return PolicyDecision(False, "no policy admits this user", None, None)

    if route.model is not None:
        reason = check_model(policy, identity.models, route.model.canonical)
        if reason is not None:
            return PolicyDecision(False, reason, policy.name, None)
    elif route.operation not in _NO_MODEL_CHECK and client_format != MESSAGES:
        return PolicyDecision(False, "the request names no model", policy.name, None)

    upstreams = servable(config, policy, client_format)
    if upstreams:
        return PolicyDecision(True, None, policy.name, upstreams[0], upstreams)
    return PolicyDecision(
        False, f"no upstream serves the {client_format} format for your policy", policy.name, None
    )
