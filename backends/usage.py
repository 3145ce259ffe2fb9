"""Token usage as Anthropic streams report it, and the meter protocol every stream parser follows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts for one request.

    ``cache_creation_input_tokens`` is the total of cache writes; the 5-minute and 1-hour split is
    kept when the upstream reports it, because the two are priced differently.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def total_input_tokens(self) -> int:
        """Input as billed: uncached input plus cache writes plus cache reads."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


@dataclass(frozen=True, slots=True)
class MeterResult:
    """What a meter learned from a response body.

    ``complete`` is true once the terminal event (``message_stop``, or a whole JSON body) was seen.
    ``error_type``/``error_message`` hold an in-stream error (a Bedrock exception frame or an SSE
    ``error`` event). ``malformed`` describes the first piece of upstream data the meter could not
    understand (a bad CRC, a lost frame boundary, an event that is not JSON); it names positions and
    stages, never payload bytes, so it is safe to log. The usage is still what the meter counted
    around it. ``estimated_output_tokens`` is a lower-bound estimate from the content relayed, used
    when a stream is cut before the final usage arrives.
    """

    usage: Usage = field(default_factory=Usage)
    complete: bool = False
    error_type: str | None = None
    error_message: str | None = None
    malformed: str | None = None
    estimated_output_tokens: int = 0
    bytes_seen: int = 0


class Meter(Protocol):
    """An incremental parser that counts usage in a response body fed in arbitrary chunks."""

    def feed(self, chunk: bytes) -> None:
        """Consume the next bytes of the body; never raises on malformed input."""

    def result(self) -> MeterResult:
        """What has been learned so far; may be called at any time, including mid-stream."""
