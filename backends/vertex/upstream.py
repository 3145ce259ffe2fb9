"""Google Vertex AI upstream: endpoint, path rewriting and OAuth access tokens.

Clients talk the Vertex wire format to the gateway and name a project and region of their own
choosing; the gateway always sends the request to the project and region it is configured with,
authorised with its own Google credential.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import urllib3
from google.auth import default as application_default
from google.auth import exceptions as google_exceptions
from google.auth.transport.urllib3 import Request
from google.oauth2 import service_account

from backends.base import Caller, Endpoint, ModelRef, Operation, SignedRequest
from backends.credentials import Expiring, RefreshingCache
from backends.errors import BackendError
from backends.vertex import ids

# https://cloud.google.com/vertex-ai/generative-ai/docs/partner-models/claude/use-claude
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)

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


def endpoint(region: str, base_url: str | None) -> Endpoint:
    """``base_url`` (the local emulator, a private endpoint), else the Vertex AI host for ``region``;
    the global endpoint has no region prefix.
    https://cloud.google.com/vertex-ai/generative-ai/docs/learn/locations#global-endpoint
    """
    if base_url is not None:
        try:
            return Endpoint.parse(base_url)
        except BackendError as exc:
            raise BackendError(f"base_url {exc}") from exc.__cause__
    return Endpoint.https(
        "aiplatform.googleapis.com" if region == "global" else f"{region}-aiplatform.googleapis.com"
    )


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
        if not ids.REGION.fullmatch(settings.region):
            raise BackendError(f"vertex upstream {settings.name!r}: region {settings.region!r} is invalid")
        if not ids.PROJECT.fullmatch(settings.project):
            raise BackendError(f"vertex upstream {settings.name!r}: project {settings.project!r} is invalid")
        self.name = settings.name
        self.settings = settings
        self.endpoint = endpoint(settings.region, settings.base_url)
        self.authority = self.endpoint.authority
        self._model_map = dict(settings.model_map)
        self._credentials = credentials
        self._transport: Any = auth_request
        self._owns_transport = auth_request is None
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: RefreshingCache[str, _Token] = RefreshingCache(
            name=f"Google access token for vertex upstream {settings.name!r}", clock=clock, maxsize=1
        )

    def model_id(self, model: ModelRef) -> str:
        """``model_map``'s Vertex id for the canonical model, else the id as parsed and rebuilt."""
        return self._model_map.get(model.canonical, model.upstream_id)

    def path(self, operation: Operation, model_id: str | None, query: str = "") -> str:
        """The path in the configured project and region: a client must not pick which project is
        billed, so the one it named is never used."""
        return ids.request_path(self.settings.project, self.settings.region, operation, model_id)

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

    def on_credential_refresh_failure(self, callback: Callable[[str], None]) -> None:
        """Report each failed credential refresh to ``callback`` with this upstream's name."""
        self._cache.on_refresh_failure(lambda: callback(self.name))

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
