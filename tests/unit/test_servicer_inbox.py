"""The ext_proc servicer's inbox: messages in order, keep-alive ticks between them, no message lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from authz.gateway.servicer import _Inbox, _Tick


def _body(text: bytes) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=text))


async def test_ticks_come_between_messages_and_no_message_is_lost() -> None:
    """Messages are read directly until a deadline is set; then a due deadline yields a tick while the
    next message is still awaited, and that message still arrives, in order, then the end."""
    gate = asyncio.Event()

    async def stream() -> AsyncIterator[ep.ProcessingRequest]:
        yield _body(b"one")
        await gate.wait()  # the upstream is silent
        yield _body(b"two")

    inbox = _Inbox(stream())
    first = await inbox.next()
    assert isinstance(first, ep.ProcessingRequest) and first.response_body.body == b"one"
    assert not inbox.waking
    inbox.wake_at(99.0, now=100.0)  # already due
    assert inbox.waking
    assert isinstance(await inbox.next(), _Tick)
    assert not inbox.waking
    gate.set()
    second = await inbox.next()
    assert isinstance(second, ep.ProcessingRequest) and second.response_body.body == b"two"
    assert await inbox.next() is None
    inbox.close()


async def test_a_later_deadline_keeps_the_earlier_timer_and_none_cancels() -> None:
    """A timer already set for an earlier time stands (its tick is checked and the timer set again);
    a deadline of None cancels it."""

    async def silent() -> AsyncIterator[ep.ProcessingRequest]:
        await asyncio.Event().wait()
        yield _body(b"never")

    inbox = _Inbox(silent())
    inbox.wake_at(1000.0, now=0.0)
    assert inbox.waking
    inbox.wake_at(2000.0, now=0.0)
    assert inbox._due == 1000.0
    inbox.wake_at(None, now=0.0)
    assert not inbox.waking
    inbox.close()


async def test_a_read_error_reaches_the_servicer() -> None:
    """An error reading the stream in the background is raised by next(), not swallowed."""

    async def broken() -> AsyncIterator[ep.ProcessingRequest]:
        yield _body(b"one")
        raise ConnectionResetError("stream reset")

    inbox = _Inbox(broken())
    await inbox.next()
    inbox.wake_at(10.0, now=0.0)
    with pytest.raises(ConnectionResetError, match="stream reset"):
        await inbox.next()
    inbox.close()
