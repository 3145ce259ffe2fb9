"""What every translator offers the ext_proc exchange (DESIGN.md, "The translation seam")."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from authz.translate.envelope import ErrorReply
from authz.translate.errors import MappedError
from backends.usage import Meter, MeterResult


@dataclass(frozen=True, slots=True)
class TranslateOptions:
    """Settings the translators share (``translate`` in the configuration), and their clock.

    ``clock`` is monotonic seconds; the exchange waits on the same clock, so tests inject one.
    """

    ping_interval: float = 10.0
    clock: Callable[[], float] = field(default=time.monotonic)


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
    duplex: bool = False
    """The translator writes the body on its own schedule (keep-alives during upstream silence):
    every chunk's bytes come from :meth:`Translator.response_chunk` and :meth:`Translator.ping`
    (ext_proc's FULL_DUPLEX_STREAMED body mode)."""


class Refused(Exception):
    """The request cannot be served as asked (raised by :meth:`Translator.request`): answer the
    client with ``reply`` and write a row with ``outcome`` and ``reason``."""

    def __init__(self, reply: ErrorReply, outcome: str, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.outcome = outcome
        self.reason = reason


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

    def next_ping(self) -> float | None:
        """When (on the options' clock) a keep-alive is due if nothing is written before; None when
        the translator writes none (it does only in duplex mode, once the body has started)."""
        ...

    def ping(self) -> bytes | None:
        """The keep-alive to write now if one is due, else None."""
        ...

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> MappedError:
        """The client format's answer to an upstream error response."""
        ...


class MeteredRelay:
    """The response side of a translator that relays the upstream's bytes as they are while its
    meter counts them (the pass-through pairs; the Messages pairs but Bedrock's stream)."""

    __slots__ = ()

    _meter: Meter

    def response_chunk(self, chunk: bytes, end: bool) -> bytes | None:
        """Count the chunk's usage and relay it unchanged."""
        if chunk:
            self._meter.feed(chunk)
        return None

    def usage(self) -> MeterResult:
        """What the meter counted so far."""
        return self._meter.result()

    def next_ping(self) -> float | None:
        """Relayed bytes carry their upstream's own keep-alives."""
        return None

    def ping(self) -> bytes | None:
        """Never: see :meth:`next_ping`."""
        return None
