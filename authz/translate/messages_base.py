"""What the three Messages-format pairs share (Messages to Bedrock, to Vertex, to the Anthropic API).

A Messages translator is built once the exchange has read the body and checked its model
(:mod:`authz.translate.messages`), so it starts from the parsed request and from the identity that
names the upstream's model id. The response side is the same for every pair but Bedrock's stream:
errors and whole answers arrive buffered, streams chunk by chunk, and the client always gets the
Anthropic error envelope (:func:`authz.translate.errors.map_messages_error`).
"""

from __future__ import annotations

from collections.abc import Mapping

from authz.identity import RequestIdentity
from authz.translate.base import MeteredRelay, ResponseStart, TranslateOptions, UpstreamRequest
from authz.translate.errors import MappedError, map_messages_error
from authz.translate.messages import REQUEST_TAGS_BETA, MessagesRequest, header_betas
from backends.base import Upstream
from backends.jsonbody import JsonMeter
from backends.sse import SseMeter
from backends.usage import Meter

# Top-level fields only the first-party API accepts: Bedrock and Vertex refuse `tags`.
FIRST_PARTY_ONLY = ("tags",)
# The meters read the response bytes, so the upstream must answer uncompressed.
REMOVE_UPSTREAM = ("accept-encoding",)


def cloud_betas(headers: Mapping[str, str]) -> list[str]:
    """The client's betas minus the one Bedrock and Vertex refuse (request tags)."""
    return [beta for beta in header_betas(headers) if beta != REQUEST_TAGS_BETA]


class MessagesPair(MeteredRelay):
    """The parts of a Messages translator every pair shares; subclasses write :meth:`request`."""

    needs_request_body = True

    def __init__(
        self,
        identity: RequestIdentity,
        upstream: Upstream,
        request: MessagesRequest,
        options: TranslateOptions,
    ) -> None:
        self._identity = identity
        self._upstream = upstream
        self._request = request
        self._options = options
        self._meter: Meter = SseMeter() if identity.streaming else JsonMeter()

    def request(self, headers: Mapping[str, str], body: bytes) -> UpstreamRequest:
        """The upstream request (each pair's own)."""
        raise NotImplementedError

    def response_headers(self, status: int, headers: Mapping[str, str]) -> ResponseStart:
        """Errors and whole answers are buffered; streams flow as they come."""
        return ResponseStart(buffer=status >= 400 or not self._identity.streaming)

    def error(self, status: int, body: bytes, headers: Mapping[str, str]) -> MappedError:
        """The Anthropic envelope: recovery messages pass, other upstream wording is hidden."""
        return map_messages_error(status, body, dict(headers))
