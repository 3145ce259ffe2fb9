"""The first-party Anthropic API: the ``anthropic`` upstream kind.

Requests go to ``https://api.anthropic.com`` (or ``base_url``) with the operator's API key in
``x-api-key`` (https://docs.anthropic.com/en/api/overview#authentication). The key is the
gateway's own, from ``credentials.api_key``: a client's ``x-api-key`` and ``Authorization`` are
removed by ext_authz before ext_proc runs (``authz/gateway/authorize.py``, ``headers_to_strip``),
so the only credential the upstream sees is the one :meth:`AnthropicUpstream.sign` sets.

No client format is relayed to this kind byte for byte (``passthrough`` is None): clients reach it
through a translating pair. The client sends ``anthropic-version`` itself, so the kind adds none.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.base import Caller, Endpoint, ModelRef, Operation, SignedRequest, Upstream
from backends.descriptor import UpstreamKind
from backends.errors import BackendError, BadModelId, ConfigError
from backends.jsonbody import JsonMeter
from backends.sse import SseMeter
from backends.usage import Meter

__all__ = ["KIND", "AnthropicConfig", "AnthropicCredentials", "AnthropicUpstream", "parse_model_id"]

DEFAULT_ENDPOINT = Endpoint.https("api.anthropic.com")

# A first-party model id: `claude-` and lower-case words joined by single hyphens, the snapshot
# date being the last word when present (`claude-haiku-4-5-20251001`, `claude-opus-5-5`).
_MODEL = re.compile(r"claude(?:-[a-z0-9]{1,32}){1,12}")
# An HTTP header value the key can travel in unchanged: one line of visible ASCII (RFC 9110,
# section 5.5); API keys are `sk-ant-...` in that alphabet. Whitespace would be a stray newline.
_KEY = re.compile(r"[\x21-\x7e]{1,512}")

# https://docs.anthropic.com/en/api/messages, .../messages-count-tokens, .../models-list
_PATHS: Mapping[str, str] = {
    "invoke": "/v1/messages",
    "stream": "/v1/messages",
    "count_tokens": "/v1/messages/count_tokens",
    "list_models": "/v1/models",
}


@dataclass(frozen=True, slots=True)
class AnthropicCredentials:
    """``credentials`` of an ``anthropic`` upstream: the API key sent as ``x-api-key``.

    Kept out of ``repr`` (and so out of any log line that prints the configuration).
    """

    api_key: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AnthropicConfig:
    """``upstreams.<name>`` for ``kind: anthropic``; ``base_url`` None means the public API."""

    credentials: AnthropicCredentials
    base_url: str | None = None
    model_map: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 5.0


def parse_model_id(raw: str) -> ModelRef:
    """Parse a first-party model id; :class:`BadModelId` unless it is ``claude-<model>[-YYYYMMDD]``.

    The id is already canonical, and the API has no regional endpoints.
    """
    if not _MODEL.fullmatch(raw):
        raise BadModelId(f"{raw!r} is not a first-party model id (claude-<model>[-YYYYMMDD])")
    return ModelRef(raw, raw, regional=False)


def _key_problem(api_key: str) -> str | None:
    # Describes the problem without repeating any of the key.
    if not api_key:
        return "is empty; set the API key, normally as ${file:/path/to/key}"
    if not _KEY.fullmatch(api_key):
        return "must be one line of visible ASCII characters (check the key file for stray whitespace)"
    return None


def validate(where: str, config: AnthropicConfig) -> None:
    """Cross-field rules; :class:`ConfigError` names the field and never repeats the key."""
    problem = _key_problem(config.credentials.api_key)
    if problem is not None:
        raise ConfigError(f"{where}.credentials.api_key", problem)
    if config.base_url is not None:
        try:
            Endpoint.parse(config.base_url)
        except BackendError as exc:
            raise ConfigError(f"{where}.base_url", str(exc)) from None
    for canonical, target in config.model_map:
        try:
            parse_model_id(target)
        except BadModelId as exc:
            raise ConfigError(f"{where}.model_map.{canonical}", str(exc)) from None


def endpoint(config: AnthropicConfig) -> Endpoint:
    """``base_url`` (a proxy in front of the API, the local emulator), else ``api.anthropic.com``."""
    if config.base_url is None:
        return DEFAULT_ENDPOINT
    try:
        return Endpoint.parse(config.base_url)
    except BackendError as exc:
        raise BackendError(f"base_url {exc}") from exc.__cause__


class AnthropicUpstream:
    """The Anthropic API plus the API key that authorises every request to it."""

    kind = "anthropic"

    def __init__(self, name: str, config: AnthropicConfig) -> None:
        problem = _key_problem(config.credentials.api_key)
        if problem is not None:
            raise BackendError(f"anthropic upstream {name!r}: credentials.api_key {problem}")
        self.name = name
        self.endpoint = endpoint(config)
        self.authority = self.endpoint.authority
        self._api_key = config.credentials.api_key
        self._model_map = dict(config.model_map)

    def __repr__(self) -> str:
        return f"AnthropicUpstream(name={self.name!r}, authority={self.authority!r})"

    def model_id(self, model: ModelRef) -> str:
        """``model_map``'s id for the canonical model, else the canonical (first-party) id itself."""
        return self._model_map.get(model.canonical, model.canonical)

    def path(self, operation: Operation, model_id: str | None, query: str = "") -> str:
        """The API path for ``operation``; the model travels in the body, so ``model_id`` is unused.

        ``query`` (already re-serialised by the route grammar) is kept for listing models only: it
        pages the list, whereas the SDKs' ``?beta=true`` on Messages changes nothing upstream
        (betas travel in the ``anthropic-beta`` header).
        """
        path = _PATHS.get(operation)
        if path is None:
            raise BackendError(f"the Anthropic API has no {operation} route")
        if operation == "list_models" and query:
            return f"{path}?{query}"
        return path

    async def sign(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        caller: Caller,
    ) -> SignedRequest:
        """Authorise the request with the configured API key, and nothing else.

        The client's own credentials never need removing here: ext_authz already stripped them.
        """
        return SignedRequest(authority=self.authority, path=path, headers={"x-api-key": self._api_key})

    async def aclose(self) -> None:
        """Nothing to release: the key is static and the upstream holds no connections."""


def _build(name: str, config: AnthropicConfig) -> Upstream:
    return AnthropicUpstream(name, config)


def _meter(streaming: bool) -> Meter:
    return SseMeter() if streaming else JsonMeter()


def _regional(_config: AnthropicConfig, _model: ModelRef | None) -> bool:
    # The API has one global endpoint; there is no regional premium to choose.
    return False


def _default_model_id(_config: AnthropicConfig, provider_ids: Mapping[str, str]) -> str | None:
    # The API knows its own ids, dated or not: the model goes as the client named it.
    return provider_ids.get("first_party")


KIND = UpstreamKind(
    name="anthropic",
    settings_type=AnthropicConfig,
    validate=validate,
    endpoint=endpoint,
    build=_build,
    # An API key does not cover the body.
    signs_body=False,
    meter=_meter,
    regional=_regional,
    parse_model_id=parse_model_id,
    default_model_id=_default_model_id,
    # No client format is relayed byte for byte: Messages-format clients need a translating pair.
    passthrough=None,
)
