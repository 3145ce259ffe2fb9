"""What every translator offers the ext_proc exchange (DESIGN.md, "The translation seam")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from authz.translate.errors import MappedError
from backends.usage import MeterResult


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """The request to send upstream: its path, header changes, and a new body (None: unchanged)."""

    path: str
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class ResponseStart:
    """What to do with the response headers: header changes, and whether the body must arrive
    whole (an error to rewrite, a non-streaming answer) rather than chunk by chunk."""

    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    buffer: bool = False


class Translator(Protocol):
    """One request's translation between its client format and its upstream's wire format."""

    needs_request_body: bool
    """Whether :meth:`request` must see the body (it rewrites it)."""

    def request(self, headers: Mapping[str, str], body: bytes) -> UpstreamRequest:
        """The upstream request for the client's (lower-cased) headers and body."""
        ...

    def response_headers(self, status: int, headers: Mapping[str, str]) -> ResponseStart:
        """React to the upstream's status and headers."""
        ...

    def response_chunk(self, chunk: bytes, end: bool) -> bytes | None:
        """The bytes to send the client for this chunk of a successful response (None: the chunk
        unchanged); usage is counted as the bytes pass."""
        ...

    def usage(self) -> MeterResult:
        """The usage counted so far."""
        ...

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> MappedError:
        """The client format's answer to an upstream error response."""
        ...
