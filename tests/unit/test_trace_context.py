"""Reading the W3C traceparent Envoy puts in the gRPC metadata (authz/telemetry/tracing.py)."""

from __future__ import annotations

import pytest

from authz.telemetry.tracing import parent_context

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_sampled_traceparent_is_the_parent() -> None:
    """Trace and span id come out as the integers the hex spells."""
    parent = parent_context([("user-agent", "grpc-c"), ("traceparent", VALID)])
    assert parent == (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7)


@pytest.mark.parametrize(
    "value",
    [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",  # not sampled
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # truncated
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",  # wrong separators
    ],
)
def test_no_parent_from_an_unsampled_or_invalid_traceparent(value: str) -> None:
    """Anything but a valid, sampled traceparent means no span (W3C Trace Context, section 3.2)."""
    assert parent_context([("traceparent", value)]) is None


def test_no_metadata_no_parent() -> None:
    """A call without metadata, or without a traceparent, is not traced."""
    assert parent_context(None) is None
    assert parent_context([("tracestate", "x=1")]) is None
