"""Google Vertex AI upstream: endpoint, path rewriting and OAuth access tokens.

Clients talk the Vertex wire format to the gateway and name a project and region of their own
choosing; the gateway always sends the request to the project and region it is configured with,
authorised with its own Google credential.
"""

from __future__ import annotations

import datetime
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import quote, unquote

import urllib3
from google.auth import default as application_default
from google.auth import exceptions as google_exceptions
from google.auth.transport.urllib3 import Request
from google.oauth2 import service_account

from backends.base import BackendError, Caller, SignedRequest, UnsupportedPathError, endpoint_from_url
from backends.credentials import Expiring, RefreshingCache

# https://cloud.google.com/vertex-ai/generative-ai/docs/partner-models/claude/use-claude
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# Project ids are 6-30 characters of lower-case letters, digits and hyphens; older projects may
# carry a domain prefix ("example.com:project").
# https://cloud.google.com/resource-manager/docs/creating-managing-projects
_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_MODEL_PATH = re.compile(
    r"/v1/projects/[^/?]+/locations/[^/?]+/publishers/anthropic/models/"
    r"(?P<model>[^/?]+):(?P<method>rawPredict|streamRawPredict)(?P<query>\?.*)?"
)
_COUNT_TOKENS = "count-tokens"
# A token without a stated expiry is refreshed after this long rather than trusted forever.
_UNKNOWN_EXPIRY_TTL = 15 * 60


@dataclass(frozen=True, slots=True)
class ApplicationDefault:
    """Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud, or the metadata server."""


@dataclass(frozen=True, slots=True)
class ServiceAccountFile:
    """A service-account JSON key file (its ``token_uri`` is honoured, so the emulator can issue tokens)."""

    path: str


@dataclass(frozen=True, slots=True)
class VertexSettings:
    """One Vertex AI upstream as the configuration describes it."""

    name: str
    project: str
    region: str
    credentials: ApplicationDefault | ServiceAccountFile
    base_url: str | None = None
    model_map: Mapping[str, str] = field(default_factory=dict)


class GoogleCredentials(Protocol):
    """The part of ``google.auth.credentials.Credentials`` the upstream uses."""

    token: str | None
    expiry: datetime.datetime | None  # naive UTC, as google-auth keeps it

    @property
    def quota_project_id(self) -> str | None:
        """The project billed for quota, when the credential names one."""
        ...

    def refresh(self, request: Any) -> None:
        """Fetch a new access token (blocking HTTP)."""
        ...


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    quota_project_id: str | None


def _load_credentials(source: ApplicationDefault | ServiceAccountFile) -> GoogleCredentials:
    # Both calls block (file reads; ADC may probe the metadata server), so this runs in the fetch
    # thread, not at construction.
    try:
        if isinstance(source, ServiceAccountFile):
            # google-auth leaves this classmethod unannotated.
            loaded: GoogleCredentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                source.path, scopes=list(SCOPES)
            )
        else:
            loaded, _project = application_default(scopes=list(SCOPES))
    except (google_exceptions.GoogleAuthError, OSError, ValueError) as exc:
        where = source.path if isinstance(source, ServiceAccountFile) else "Application Default Credentials"
        # A file error's text (the path, "No such file") helps; a malformed key's ValueError
        # text is left out because it may quote key material.
        detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else type(exc).__name__
        raise BackendError(f"loading Google credentials from {where} failed ({detail})") from exc
    return loaded


def _auth_transport() -> Any:
    # google-auth's urllib3 transport: urllib3 is installed with botocore already, whereas the
    # requests transport would need the requests package. Either honours the key file's token_uri.
    # https://googleapis.dev/python/google-auth/latest/reference/google.auth.transport.urllib3.html
    # google-auth leaves Request.__init__ unannotated.
    return Request(urllib3.PoolManager(timeout=urllib3.Timeout(connect=5, read=10)))  # type: ignore[no-untyped-call]


def default_host(region: str) -> str:
    """The Vertex AI host for ``region``; the global endpoint has no region prefix.

    https://cloud.google.com/vertex-ai/generative-ai/docs/learn/locations#global-endpoint
    """
    return "aiplatform.googleapis.com" if region == "global" else f"{region}-aiplatform.googleapis.com"


class VertexUpstream:
    """A Vertex AI endpoint plus the Google credential whose access token authorises requests.

    ``credentials`` and ``auth_request`` (a ``google.auth.transport.Request``) are injectable for
    tests; by default both are built from the settings on the first token fetch, in a thread.
    """

    kind = "vertex"

    def __init__(
        self,
        settings: VertexSettings,
        *,
        credentials: GoogleCredentials | None = None,
        auth_request: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not _REGION.fullmatch(settings.region):
            raise BackendError(f"vertex upstream {settings.name!r}: region {settings.region!r} is invalid")
        if not _PROJECT.fullmatch(settings.project):
            raise BackendError(f"vertex upstream {settings.name!r}: project {settings.project!r} is invalid")
        self.name = settings.name
        self.settings = settings
        if settings.base_url is not None:
            self.scheme, self.authority = endpoint_from_url(settings.base_url)
        else:
            self.scheme, self.authority = "https", default_host(settings.region)
        self._model_map = dict(settings.model_map)
        self._credentials = credentials
        self._transport: Any = auth_request
        self._owns_transport = auth_request is None
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: RefreshingCache[str, _Token] = RefreshingCache(
            name=f"Google access token for vertex upstream {settings.name!r}", clock=clock, maxsize=1
        )

    def upstream_path(self, ingress_path: str, model_id: str) -> str:
        """Rewrite the ingress path onto the configured project and region.

        The client's project and region are ignored (a client must not pick which project is
        billed); the method and the model (or ``model_map``'s replacement) are kept. Count-tokens
        (``models/count-tokens:rawPredict``) is kept as is.
        """
        match = _MODEL_PATH.fullmatch(ingress_path)
        if match is None or match["model"] in (".", ".."):
            raise UnsupportedPathError(f"vertex upstream {self.name!r} does not serve this path")
        segment, method = match["model"], match["method"]
        if segment == _COUNT_TOKENS:
            if method != "rawPredict":
                raise UnsupportedPathError(f"vertex upstream {self.name!r}: count-tokens takes rawPredict")
        else:
            mapped = self._model_map.get(model_id or unquote(segment))
            if mapped is not None:
                # '@' separates a Vertex model's version ("claude-haiku-4-5@20251001").
                segment = quote(mapped, safe="-_.~@")
        return (
            f"/v1/projects/{self.settings.project}/locations/{self.settings.region}"
            f"/publishers/anthropic/models/{segment}:{method}{match['query'] or ''}"
        )

    async def sign(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        caller: Caller,
    ) -> SignedRequest:
        """Authorise the request with the upstream's OAuth access token (scope cloud-platform)."""
        token = await self._cache.get("", self._fetch_token)
        out = {"authorization": f"Bearer {token.value}"}
        if token.quota_project_id:
            # User credentials (gcloud ADC) need the quota project named, as google-auth's apply() does.
            out["x-goog-user-project"] = token.quota_project_id
        return SignedRequest(authority=self.authority, path=path, headers=out)

    async def aclose(self) -> None:
        """Stop an in-flight token refresh and close the token endpoint's connection pool."""
        await self._cache.aclose()
        transport = self._transport
        if self._owns_transport and transport is not None:
            # The urllib3 transport's PoolManager holds the token endpoint's connections.
            transport.http.clear()

    def _fetch_token(self) -> Expiring[_Token]:
        # Runs in a worker thread: loading the key and refreshing both block on I/O.
        with self._lock:
            if self._credentials is None:
                self._credentials = _load_credentials(self.settings.credentials)
            if self._transport is None:
                self._transport = _auth_transport()
            credentials = self._credentials
        try:
            credentials.refresh(self._transport)
        except (google_exceptions.GoogleAuthError, OSError, ValueError) as exc:
            # RefreshError carries the token endpoint's error text; it stays out of the message
            # (it may echo the assertion's claims), the exception chain keeps it for debugging.
            raise BackendError(
                f"vertex upstream {self.name!r}: refreshing the Google access token failed "
                f"({type(exc).__name__}); check the service account key or ADC and its token_uri"
            ) from exc
        if not credentials.token:
            raise BackendError(f"vertex upstream {self.name!r}: Google returned no access token")
        expiry = credentials.expiry
        if expiry is None:
            expires_at = self._clock() + _UNKNOWN_EXPIRY_TTL
        else:
            if expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=datetime.UTC)
            expires_at = expiry.timestamp()
        return Expiring(_Token(credentials.token, credentials.quota_project_id), expires_at)
