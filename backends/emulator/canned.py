"""Canned Anthropic Messages API answers: what the emulator streams and what the tests feed the meters.

The builders produce exactly what the Anthropic API sends, so the upstream emulator and the tests
exercise the same shapes the clouds return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends.usage import Usage


def _usage_dict(usage: Usage, *, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.cache_creation_5m_input_tokens,
            "ephemeral_1h_input_tokens": usage.cache_creation_1h_input_tokens,
        },
        "output_tokens": output_tokens,
    }


def canned_events(
    *, model: str, text_chunks: Sequence[str], usage: Usage, message_id: str = "msg_emulator"
) -> list[dict[str, Any]]:
    """The event sequence the Messages API streams for a one-block text answer.

    ``message_start`` reports ``output_tokens: 1`` as the real API does; ``message_delta`` carries
    the cumulative final counts, including the input and cache fields.
    """
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _usage_dict(usage, output_tokens=1),
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ]
    events.extend(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": chunk}}
        for chunk in text_chunks
    )
    events.append({"type": "content_block_stop", "index": 0})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {
                "input_tokens": usage.input_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens,
                "output_tokens": usage.output_tokens,
            },
        }
    )
    events.append({"type": "message_stop"})
    return events


def canned_message(
    *, model: str, text: str, usage: Usage, message_id: str = "msg_emulator"
) -> dict[str, Any]:
    """The non-streaming Messages API response body for a one-block text answer."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _usage_dict(usage, output_tokens=usage.output_tokens),
    }
