"""What the emulator answers, which credentials it accepts, and what it was asked.

One mutable ``EmulatorState`` per emulator. Tests change it in-process or through
``POST /_emulator/state`` with a JSON patch (``apply_patch``), and read the recordings back. All
behaviour is deterministic: the same state gives byte-identical responses.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.emulator.google import ServiceAccountPublicKey, load_service_account_public_key
from backends.emulator.sigv4 import AwsIdentity
from backends.usage import Usage

ACCOUNT_ID = "123456789012"
TEST_ACCESS_KEY_ID = "AKIDEMULATOR0000001"
# A published test secret: it only ever unlocks the local emulator.
TEST_SECRET_ACCESS_KEY = "emulatorSecretAccessKey/0000000000000001"  # noqa: S105
TEST_PRINCIPAL_ARN = f"arn:aws:iam::{ACCOUNT_ID}:user/claude-gateway"
DEFAULT_ROLE_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/EmulatorBedrockRole"
DEFAULT_AWS_REGION = "us-east-1"
DEFAULT_PROJECT = "emulator-project"
# A published test key: it only ever unlocks the local emulator.
TEST_ANTHROPIC_API_KEY = "sk-ant-emulator-0000000000000001"
DEFAULT_TEXT = "Hello from the upstream emulator. "
DEFAULT_USAGE = Usage(
    input_tokens=25,
    output_tokens=40,
    cache_creation_input_tokens=10,
    cache_creation_5m_input_tokens=7,
    cache_creation_1h_input_tokens=3,
    cache_read_input_tokens=11,
)
MAX_RECORDED = 10_000


class Scenario(enum.StrEnum):
    """How inference routes answer."""

    NORMAL = "normal"
    TOO_LONG = "too_long"
    SERVER_ERROR = "server_error"
    EXCEPTION_MIDSTREAM = "exception_midstream"
    # The connection is dropped after half of a stream's events (no terminal chunk).
    CUT_MIDSTREAM = "cut_midstream"


# Statuses the emulator can be told to fail inference requests with (Failure.status).
FAILURE_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
# The emulated clouds, as inference routes are recorded (RecordedRequest.route: "<kind>.<action>").
KINDS = ("bedrock", "vertex", "anthropic")


@dataclass(slots=True)
class Failure:
    """Inference requests to fail with ``status`` before they are served (after their credential
    was checked, so a failed request still says whether it was signed right): those of ``kinds``
    (empty: every kind), the next ``count`` of them (None: all), in each kind's own error shape."""

    status: int
    kinds: tuple[str, ...] = ()
    count: int | None = None

    def take(self, kind: str) -> bool:
        """Whether a request of ``kind`` fails now (and one fewer will)."""
        if (self.kinds and kind not in self.kinds) or self.count == 0:
            return False
        if self.count is not None:
            self.count -= 1
        return True


@dataclass(slots=True)
class RecordedRequest:
    """One request as the emulator received it; ``verdict`` is ``ok``, ``skipped`` or the refusal.

    ``headers`` are all the request's headers and ``body_keys`` the body's top-level keys, so a test
    can see that unknown ones arrived.

    ``usage`` is what the answer reported when the emulator served a whole message (None for
    errors, count-tokens and cut-short streams), so a test can compare the gateway's accounting
    with what the upstream really said.
    """

    method: str
    raw_path: str
    route: str
    headers: dict[str, str]
    body_length: int
    body_keys: list[str] | None
    time: float
    model_id: str | None = None
    verdict: str = "n/a"
    status: int = 0
    stream_cut: bool = False
    usage: Usage | None = None
    # The body's `anthropic_beta` list (Bedrock's place for betas), when it has one.
    body_betas: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form served by ``GET /_emulator/requests``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class AssumeRoleCall:
    """One AssumeRole call, granted or not."""

    role_arn: str
    role_session_name: str
    external_id: str | None
    source_identity: str | None
    tags: tuple[tuple[str, str], ...]
    duration_seconds: int
    caller_access_key_id: str | None
    granted: bool
    time: float

    def to_json(self) -> dict[str, Any]:
        """The JSON form served by ``GET /_emulator/assume-role-calls``; tags become a mapping."""
        document = dataclasses.asdict(self)
        document["tags"] = dict(self.tags)
        return document


@dataclass(slots=True)
class EmulatorState:
    """Behaviour (patchable), accepted credentials, and recordings of one emulator.

    ``version`` changes on every patch so precomputed responses know when to rebuild.
    """

    scenario: Scenario = Scenario.NORMAL
    usage: Usage = DEFAULT_USAGE
    deltas: int = 5
    delay: float = 0.0
    # Seconds before the response headers of an inference answer (a slow first byte).
    first_byte_delay: float = 0.0
    text: str = DEFAULT_TEXT
    # Headers added to every inference answer, as a real upstream adds its own (the Anthropic API's
    # anthropic-ratelimit-*, say), to check what the gateway lets through.
    response_headers: dict[str, str] = field(default_factory=dict)
    # Inference requests to fail before they are served (failover tests); None: none.
    fail: Failure | None = None
    verify: bool = True
    aws_region: str = DEFAULT_AWS_REGION
    aws_keys: dict[str, str] = field(default_factory=lambda: {TEST_ACCESS_KEY_ID: TEST_SECRET_ACCESS_KEY})
    # Role ARN -> the ExternalId AssumeRole must carry for it (None: no ExternalId required).
    allowed_roles: dict[str, str | None] = field(default_factory=lambda: {DEFAULT_ROLE_ARN: None})
    max_session_duration: int = 3600
    projects: list[str] = field(default_factory=lambda: [DEFAULT_PROJECT])
    anthropic_api_keys: list[str] = field(default_factory=lambda: [TEST_ANTHROPIC_API_KEY])
    base_url: str = ""
    version: int = 0
    temporary_keys: dict[str, AwsIdentity] = field(default_factory=dict)
    service_accounts: dict[str, ServiceAccountPublicKey] = field(default_factory=dict)
    access_tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    requests: collections.deque[RecordedRequest] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_RECORDED)
    )
    assume_role_calls: list[AssumeRoleCall] = field(default_factory=list)
    defaults: dict[str, Any] | None = None

    def text_chunks(self) -> list[str]:
        """The text split into ``deltas`` non-empty pieces, repeating it when it is too short."""
        text = self.text
        if len(text) < self.deltas:
            text = text * -(-self.deltas // len(text))
        size = len(text)
        return [text[i * size // self.deltas : (i + 1) * size // self.deltas] for i in range(self.deltas)]

    def find_aws_identity(self, access_key_id: str) -> AwsIdentity | None:
        """The identity for an access key: a static key from ``aws_keys`` or an issued temporary one."""
        secret = self.aws_keys.get(access_key_id)
        if secret is not None:
            return AwsIdentity(access_key_id, secret, TEST_PRINCIPAL_ARN)
        return self.temporary_keys.get(access_key_id)

    def add_temporary_key(self, identity: AwsIdentity) -> None:
        """Accept an AssumeRole-issued key until it expires, forgetting long-expired ones."""
        now = time.time()
        expired = [
            key for key, value in self.temporary_keys.items() if (value.expires_at or now) < now - 3600
        ]
        for key in expired:
            del self.temporary_keys[key]
        self.temporary_keys[identity.access_key_id] = identity

    def register_service_account(self, key: ServiceAccountPublicKey) -> None:
        """Trust assertions signed by this service-account key, like Google after key creation."""
        self.service_accounts[key.key_id] = key

    def register_service_account_file(self, path: Path) -> ServiceAccountPublicKey:
        """Register the public half of a service-account key file and return it."""
        key = load_service_account_public_key(path)
        self.register_service_account(key)
        return key

    def issue_access_token(self, token: str, client_email: str, expires_at: float) -> None:
        """Accept a bearer token on Vertex routes until ``expires_at``."""
        now = time.time()
        for stale in [t for t, (_, exp) in self.access_tokens.items() if exp < now - 3600]:
            del self.access_tokens[stale]
        self.access_tokens[token] = (client_email, expires_at)

    def access_token_owner(self, token: str, now: float) -> str | None:
        """The service account a live token was issued to, or None when unknown or expired."""
        entry = self.access_tokens.get(token)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def expire_credentials(self) -> None:
        """Make every issued temporary key and access token expired, to exercise refresh paths."""
        past = time.time() - 1
        self.temporary_keys = {
            key: dataclasses.replace(value, expires_at=past) for key, value in self.temporary_keys.items()
        }
        self.access_tokens = {token: (email, past) for token, (email, _) in self.access_tokens.items()}

    def keep_as_defaults(self) -> None:
        """Make the current behaviour what ``reset`` restores (e.g. ``--no-verify`` from the CLI)."""
        self.defaults = copy.deepcopy({name: getattr(self, name) for name in _BEHAVIOUR_FIELDS})

    def reset(self) -> None:
        """Restore default behaviour and clear recordings; issued credentials stay valid.

        Credentials survive because a gateway under test caches them across test cases.
        """
        defaults = self.defaults or {name: getattr(EmulatorState(), name) for name in _BEHAVIOUR_FIELDS}
        for name, value in copy.deepcopy(defaults).items():
            setattr(self, name, value)
        self.requests.clear()
        self.assume_role_calls.clear()
        self.version += 1

    def apply_patch(self, patch: Mapping[str, Any]) -> None:
        """Apply a JSON patch of behaviour fields; raises ``ValueError`` on unknown keys or bad values.

        Besides the fields, ``reset: true`` restores defaults first, ``expire_credentials: true``
        expires issued credentials, and ``service_account_keys`` lists key files to register.
        """
        unknown = (
            set(patch) - set(_BEHAVIOUR_FIELDS) - {"reset", "expire_credentials", "service_account_keys"}
        )
        if unknown:
            raise ValueError(f"unknown state fields: {sorted(unknown)}")
        if patch.get("reset"):
            self.reset()
        for name in _BEHAVIOUR_FIELDS:
            if name in patch:
                setattr(self, name, _coerce(name, patch[name], self))
        if patch.get("expire_credentials"):
            self.expire_credentials()
        for path in _typed(patch.get("service_account_keys", []), list, "service_account_keys"):
            self.register_service_account_file(Path(_typed(path, str, "service_account_keys[]")))
        self.version += 1

    def describe(self) -> dict[str, Any]:
        """The current behaviour fields as JSON."""
        document = {name: getattr(self, name) for name in _BEHAVIOUR_FIELDS}
        document["usage"] = dataclasses.asdict(self.usage)
        document["fail"] = dataclasses.asdict(self.fail) if self.fail is not None else None
        document["aws_keys"] = sorted(self.aws_keys)  # the ids only: secrets stay out of logs
        document["anthropic_api_keys"] = len(self.anthropic_api_keys)  # how many, never the keys
        return document


_BEHAVIOUR_FIELDS = (
    "scenario",
    "usage",
    "deltas",
    "delay",
    "first_byte_delay",
    "text",
    "response_headers",
    "fail",
    "verify",
    "aws_region",
    "aws_keys",
    "allowed_roles",
    "max_session_duration",
    "projects",
    "anthropic_api_keys",
)


def _typed(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    # bool is an int subclass; a JSON true must not pass as a count.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    return value


def _coerce(name: str, value: Any, state: EmulatorState) -> Any:
    """Validate one patched field and convert it from JSON."""
    if name == "scenario":
        return Scenario(_typed(value, str, name))
    if name == "usage":
        fields = {**dataclasses.asdict(state.usage), **_typed(value, dict, name)}
        unknown = set(fields) - {f.name for f in dataclasses.fields(Usage)}
        if unknown:
            raise ValueError(f"usage: unknown fields {sorted(unknown)}")
        for key, count in fields.items():
            if _typed(count, int, f"usage.{key}") < 0:
                raise ValueError(f"usage.{key} must not be negative")
        split = ("cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens")
        if "cache_creation_input_tokens" not in value and any(key in value for key in split):
            fields["cache_creation_input_tokens"] = sum(fields[key] for key in split)
        return Usage(**fields)
    if name == "deltas":
        if _typed(value, int, name) < 1:
            raise ValueError("deltas must be at least 1")
        return value
    if name in ("delay", "first_byte_delay"):
        if _typed(value, (int, float), name) < 0:
            raise ValueError(f"{name} must not be negative")
        return float(value)
    if name in ("text", "aws_region"):
        if not _typed(value, str, name):
            raise ValueError(f"{name} must not be empty")
        return value
    if name == "verify":
        return _typed(value, bool, name)
    if name == "fail":
        return _failure(value)
    if name == "max_session_duration":
        return _typed(value, int, name)
    if name in ("aws_keys", "response_headers"):
        return {_typed(k, str, name): _typed(v, str, name) for k, v in _typed(value, dict, name).items()}
    if name == "allowed_roles":
        return {
            _typed(k, str, name): None if v is None else _typed(v, str, name)
            for k, v in _typed(value, dict, name).items()
        }
    if name == "projects":
        return [_typed(project, str, name) for project in _typed(value, list, name)]
    if name == "anthropic_api_keys":
        return [_typed(key, str, name) for key in _typed(value, list, name)]
    raise ValueError(f"unknown state field {name}")  # pragma: no cover - guarded by apply_patch


def _failure(value: Any) -> Failure | None:
    """``fail``: null, or ``{"status": 503, "kinds": ["bedrock"], "count": 1}``."""
    if value is None:
        return None
    document = _typed(value, dict, "fail")
    unknown = set(document) - {"status", "kinds", "count"}
    if unknown:
        raise ValueError(f"fail: unknown fields {sorted(unknown)}")
    status = _typed(document.get("status"), int, "fail.status")
    if status not in FAILURE_STATUSES:
        raise ValueError(f"fail.status must be one of {sorted(FAILURE_STATUSES)}")
    kinds = tuple(
        _typed(k, str, "fail.kinds[]") for k in _typed(document.get("kinds", []), list, "fail.kinds")
    )
    if not set(kinds) <= set(KINDS):
        raise ValueError(f"fail.kinds must name {', '.join(KINDS)}")
    count = document.get("count")
    if count is not None and _typed(count, int, "fail.count") < 1:
        raise ValueError("fail.count must be at least 1 (or null: every request)")
    return Failure(status, kinds, count)
