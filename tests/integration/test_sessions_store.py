"""The session store against a real PostgreSQL: device flow, sign-in state, sessions, revocation, audit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from authz.store import sessions as store
from authz.store.db import Pool, connect, connect_pool
from authz.store.sessions import REFRESH_TOKEN_REUSE, REVOCATION_CHANNEL, VerifiedIdentity, hash_token

pytestmark = pytest.mark.integration

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=10)
LIFETIME = timedelta(days=7)
BROWSER = hash_token("browser-cookie-value")
OTHER_BROWSER = hash_token("someone-else's-cookie")
NEXT_BROWSER = hash_token("the-browser-cookie-minted-at-the-callback")


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


@pytest.fixture
async def pool(clean_db: str) -> AsyncIterator[Pool]:
    """A pool on the migrated test database with every session table emptied."""
    pool = await connect_pool(clean_db, timeout=10)
    try:
        await pool.execute(
            "TRUNCATE sessions, refresh_tokens, device_codes, auth_requests, audit_events, logout_jtis"
        )
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def notifications(dsn: str) -> AsyncIterator[asyncio.Queue[str]]:
    """Payloads NOTIFYed on the revocation channel while the block runs."""
    conn = await connect(dsn, timeout=10)
    queue: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(*args: Any) -> None:
        queue.put_nowait(args[3])

    await conn.add_listener(REVOCATION_CHANNEL, on_notify)
    try:
        yield queue
    finally:
        await conn.close()


async def drain(queue: asyncio.Queue[str], count: int) -> list[str]:
    """``count`` payloads from ``queue``, each within 2 seconds, sorted."""
    return sorted([await asyncio.wait_for(queue.get(), 2) for _ in range(count)])


async def new_device(pool: Pool, code: str = "WDJBMJHT", *, interval: int = 5) -> bytes:
    device_hash = hash_token(f"device-{code}")
    created = await store.create_device_code(
        pool,
        device_code_hash=device_hash,
        user_code=code,
        ttl=TTL,
        interval=interval,
        surface="claude_code",
        user_agent="claude-cli/2.1.0",
        client_ip="192.0.2.7",
        now=NOW,
    )
    assert created is not None
    return device_hash


async def new_session(
    pool: Pool,
    session_id: str = "sess-1",
    *,
    email: str = "ada@example.com",
    sub: str = "00u-ada",
    idp_sid: str | None = "idp-sid-1",
    refresh: str | None = "refresh-1",
    lifetime: timedelta = LIFETIME,
    created: datetime = NOW,
) -> store.Session:
    return await store.create_session(
        pool,
        session_id=session_id,
        sub=sub,
        email=email,
        groups=("eng", "ml"),
        idp_sid=idp_sid,
        idp_refresh_token_enc=b"\x01sealed-idp-token",
        surface="claude_code",
        user_agent="claude-cli/2.1.0",
        lifetime=lifetime,
        now=created,
        refresh_token_hash=None if refresh is None else hash_token(refresh),
    )


# --- device flow -------------------------------------------------------------------------------------


async def test_a_new_device_code_round_trips_and_is_found_by_its_user_code(pool: Pool) -> None:
    """A new device code is pending with its interval and is found by user code until it expires."""
    await new_device(pool)
    found = await store.find_device_by_user_code(pool, "WDJBMJHT", at(1))
    assert found is not None
    assert (found.status, found.poll_interval, found.expires_at) == ("pending", 5, NOW + TTL)
    assert (found.surface, found.user_agent, found.client_ip) == (
        "claude_code",
        "claude-cli/2.1.0",
        "192.0.2.7",
    )
    assert await store.find_device_by_user_code(pool, "WDJBMJHT", NOW + TTL) is None
    assert await store.find_device_by_user_code(pool, "XXXXXXXX", at(1)) is None


async def test_a_user_code_held_by_a_live_code_is_refused_but_an_expired_one_is_reused(pool: Pool) -> None:
    """Creating a device code whose user code is live returns None; once that code expired it succeeds."""
    await new_device(pool)
    args: dict[str, Any] = {
        "user_code": "WDJBMJHT",
        "ttl": TTL,
        "interval": 5,
        "surface": None,
        "user_agent": None,
        "client_ip": None,
    }
    clash = await store.create_device_code(pool, device_code_hash=hash_token("other"), now=at(1), **args)
    assert clash is None
    later = await store.create_device_code(pool, device_code_hash=hash_token("other"), now=NOW + TTL, **args)
    assert later is not None and later.status == "pending"


async def test_polling_an_unknown_device_code_is_invalid_grant(pool: Pool) -> None:
    """A device code never issued gets invalid_grant."""
    result = await store.poll_device(pool, hash_token("never-issued"), NOW)
    assert result.error == "invalid_grant"
    assert result.session is None


async def test_polling_a_pending_code_on_time_is_authorization_pending(pool: Pool) -> None:
    """Polls spaced by the interval get authorization_pending and leave the interval alone."""
    device = await new_device(pool)
    for t in (0, 5, 10, 15):
        result = await store.poll_device(pool, device, at(t))
        assert (result.error, result.interval) == ("authorization_pending", 5)


async def test_polling_too_fast_is_slow_down_and_the_stored_interval_grows_by_five(pool: Pool) -> None:
    """Each early poll gets slow_down and adds 5 s to the stored interval, which later polls must respect."""
    device = await new_device(pool)
    assert (await store.poll_device(pool, device, at(0))).error == "authorization_pending"
    first = await store.poll_device(pool, device, at(1))
    assert (first.error, first.interval) == ("slow_down", 10)
    # 6 s after the last poll is on time for the old interval, early for the new one.
    second = await store.poll_device(pool, device, at(7))
    assert (second.error, second.interval) == ("slow_down", 15)
    third = await store.poll_device(pool, device, at(22))
    assert (third.error, third.interval) == ("authorization_pending", 15)
    row = await store.find_device_by_user_code(pool, "WDJBMJHT", at(22))
    assert row is not None and row.poll_interval == 15 and row.last_poll_at == at(22)


async def test_polling_an_expired_code_is_expired_token(pool: Pool) -> None:
    """A poll at or after the code's expiry gets expired_token."""
    device = await new_device(pool)
    assert (await store.poll_device(pool, device, NOW + TTL)).error == "expired_token"


async def test_polling_a_denied_code_is_access_denied(pool: Pool) -> None:
    """Once the user denies the device, polls get access_denied."""
    device = await new_device(pool)
    assert await store.deny_device(pool, "WDJBMJHT", at(1), email="ada@example.com")
    assert (await store.poll_device(pool, device, at(2))).error == "access_denied"
    assert not await store.approve_device(pool, "WDJBMJHT", "sess-1", "ada@example.com", at(3))


async def test_an_approved_code_yields_its_session_once_then_invalid_grant(pool: Pool) -> None:
    """The first poll after approval returns the session and its refresh token; the next is invalid_grant."""
    device = await new_device(pool)
    await new_session(pool, refresh=None)
    assert await store.approve_device(pool, "WDJBMJHT", "sess-1", "ada@example.com", at(1))
    assert not await store.approve_device(pool, "WDJBMJHT", "sess-2", "eve@example.com", at(1))
    # Even a poll that comes early is answered at once: only a pending code is rate limited.
    result = await store.poll_device(pool, device, at(2), refresh_token_hash=hash_token("first-refresh"))
    assert result.error is None
    assert result.session is not None and result.session.id == "sess-1"
    assert await store.session_id_for_refresh_token(pool, hash_token("first-refresh")) == "sess-1"
    again = await store.poll_device(pool, device, at(10), refresh_token_hash=hash_token("second-refresh"))
    assert (again.error, again.session) == ("invalid_grant", None)
    assert await store.session_id_for_refresh_token(pool, hash_token("second-refresh")) is None
    row = await store.find_device_by_user_code(pool, "WDJBMJHT", at(10))
    assert row is not None and (row.status, row.session_id, row.email) == (
        "consumed",
        "sess-1",
        "ada@example.com",
    )


async def test_concurrent_polls_of_an_approved_code_hand_out_the_session_once(
    pool: Pool, clean_db: str
) -> None:
    """Eight simultaneous polls of an approved code: exactly one gets the session."""
    device = await new_device(pool)
    await new_session(pool, refresh=None)
    assert await store.approve_device(pool, "WDJBMJHT", "sess-1", "ada@example.com", at(1))
    big = await connect_pool(clean_db, min_size=8, max_size=8, timeout=10)
    try:
        results = await asyncio.gather(*(store.poll_device(big, device, at(6)) for _ in range(8)))
    finally:
        await big.close()
    assert sorted(str(r.error) for r in results) == ["None"] + ["invalid_grant"] * 7


async def test_a_revoked_session_is_not_handed_out_by_its_device_code(pool: Pool) -> None:
    """A session revoked between approval and poll yields invalid_grant and no refresh token."""
    device = await new_device(pool)
    await new_session(pool, refresh=None)
    assert await store.approve_device(pool, "WDJBMJHT", "sess-1", "ada@example.com", at(1))
    assert await store.revoke_session(pool, "sess-1", "admin_revoke", at(2))
    result = await store.poll_device(pool, device, at(6), refresh_token_hash=hash_token("r"))
    assert (result.error, result.session) == ("invalid_grant", None)
    assert await store.session_id_for_refresh_token(pool, hash_token("r")) is None


async def test_an_expired_code_cannot_be_approved(pool: Pool) -> None:
    """Approving or denying a code after its expiry changes nothing."""
    await new_device(pool)
    assert not await store.approve_device(pool, "WDJBMJHT", "sess-1", "ada@example.com", NOW + TTL)
    assert not await store.deny_device(pool, "WDJBMJHT", NOW + TTL)


# --- auth requests and approvals ------------------------------------------------------------------


async def new_auth_request(pool: Pool, state: str = "state-1") -> store.AuthRequest:
    return await store.create_auth_request(
        pool,
        state=state,
        browser_hash=BROWSER,
        user_code="WDJBMJHT",
        nonce="nonce-1",
        code_verifier="verifier-1",
        ttl=TTL,
        now=NOW,
    )


async def test_an_auth_request_is_consumed_once(pool: Pool) -> None:
    """The first callback gets the request with its nonce and verifier; a second gets state_reused."""
    await new_auth_request(pool)
    taken = await store.consume_auth_request(pool, "state-1", BROWSER, at(30))
    assert isinstance(taken, store.AuthRequest)
    assert (taken.nonce, taken.code_verifier, taken.user_code, taken.used_at) == (
        "nonce-1",
        "verifier-1",
        "WDJBMJHT",
        at(30),
    )
    assert await store.consume_auth_request(pool, "state-1", BROWSER, at(31)) == "state_reused"


async def test_an_auth_request_is_bound_to_its_browser(pool: Pool) -> None:
    """Another browser gets state_mismatch and does not use the request up for the right one."""
    await new_auth_request(pool)
    assert await store.consume_auth_request(pool, "state-1", OTHER_BROWSER, at(30)) == "state_mismatch"
    assert isinstance(await store.consume_auth_request(pool, "state-1", BROWSER, at(31)), store.AuthRequest)


async def test_unknown_and_expired_auth_requests_are_refused(pool: Pool) -> None:
    """An unknown state is state_unknown; a request past its ttl is state_expired."""
    await new_auth_request(pool)
    assert await store.consume_auth_request(pool, "no-such-state", BROWSER, at(1)) == "state_unknown"
    assert await store.consume_auth_request(pool, "state-1", BROWSER, NOW + TTL) == "state_expired"


IDENTITY = VerifiedIdentity(
    sub="00u-ada",
    email="ada@example.com",
    groups=("eng", "ml"),
    idp_sid="idp-sid-1",
    idp_refresh_token_enc=b"\x01\x00\xffsealed",
)


async def test_an_approval_round_trips_once_to_the_browser_that_signed_in(pool: Pool) -> None:
    """The identity parked at the callback comes back once, byte for byte, only to the browser holding
    the binding value the callback minted."""
    await new_auth_request(pool)
    # The callback rotates the browser's binding cookie: the approval is bound to the new one.
    store_args: dict[str, Any] = {
        "approval_id": "appr-1",
        "identity": IDENTITY,
        "ttl": TTL,
        "browser_hash": NEXT_BROWSER,
    }
    # Not before the callback consumed the request.
    assert not await store.store_approval(pool, state="state-1", now=at(1), **store_args)
    assert isinstance(await store.consume_auth_request(pool, "state-1", BROWSER, at(2)), store.AuthRequest)
    assert await store.store_approval(pool, state="state-1", now=at(3), **store_args)
    assert not await store.store_approval(
        pool, state="state-1", now=at(4), **store_args | {"approval_id": "x"}
    )

    assert await store.take_approval(pool, "appr-1", OTHER_BROWSER, at(5)) == "approval_mismatch"
    assert await store.take_approval(pool, "appr-1", BROWSER, at(5)) == "approval_mismatch"
    approval = await store.take_approval(pool, "appr-1", NEXT_BROWSER, at(6))
    assert isinstance(approval, store.Approval)
    assert (approval.identity, approval.user_code, approval.state) == (IDENTITY, "WDJBMJHT", "state-1")
    assert await store.take_approval(pool, "appr-1", NEXT_BROWSER, at(7)) == "approval_reused"
    # The sealed IdP refresh token does not linger once handed on.
    assert await pool.fetchval("SELECT identity FROM auth_requests WHERE state = 'state-1'") is None


async def test_unknown_and_expired_approvals_are_refused(pool: Pool) -> None:
    """An unknown approval id is approval_unknown; one past its ttl is approval_expired."""
    await new_auth_request(pool)
    assert isinstance(await store.consume_auth_request(pool, "state-1", BROWSER, at(1)), store.AuthRequest)
    assert await store.store_approval(
        pool,
        state="state-1",
        approval_id="appr-1",
        browser_hash=BROWSER,
        identity=IDENTITY,
        ttl=TTL,
        now=at(2),
    )
    assert await store.take_approval(pool, "appr-2", BROWSER, at(3)) == "approval_unknown"
    assert await store.take_approval(pool, "appr-1", BROWSER, at(2) + TTL) == "approval_expired"


# --- sessions and refresh tokens ----------------------------------------------------------------


async def test_a_session_round_trips_with_its_first_refresh_token(pool: Pool) -> None:
    """create_session stores every field, the absolute expiry, and the first refresh token."""
    created = await new_session(pool)
    assert created == await store.get_session(pool, "sess-1")
    assert (created.sub, created.email, created.groups, created.idp_sid) == (
        "00u-ada",
        "ada@example.com",
        ("eng", "ml"),
        "idp-sid-1",
    )
    assert created.idp_refresh_token_enc == b"\x01sealed-idp-token"
    assert (created.created_at, created.last_refresh_at, created.expires_at) == (NOW, NOW, NOW + LIFETIME)
    assert created.is_active(NOW) and not created.is_active(NOW + LIFETIME)
    assert await store.session_id_for_refresh_token(pool, hash_token("refresh-1")) == "sess-1"
    assert await store.get_session(pool, "nope") is None
    assert len(store.new_session_id()) >= 22 and len(store.new_opaque_token()) >= 43


async def test_rotation_spends_the_old_token_and_issues_the_new_one(pool: Pool) -> None:
    """A rotated refresh token returns the session; the new token then rotates in its turn."""
    await new_session(pool)
    first = await store.rotate_refresh_token(pool, hash_token("refresh-1"), hash_token("refresh-2"), at(60))
    assert first.status == "ok" and first.session is not None and first.session.id == "sess-1"
    second = await store.rotate_refresh_token(pool, hash_token("refresh-2"), hash_token("refresh-3"), at(120))
    assert second.status == "ok"


async def test_reusing_a_spent_refresh_token_revokes_the_session_and_notifies(
    pool: Pool, clean_db: str
) -> None:
    """Presenting a spent refresh token returns reused, revokes the session for reuse, and NOTIFYs its id."""
    await new_session(pool)
    async with notifications(clean_db) as queue:
        ok = await store.rotate_refresh_token(pool, hash_token("refresh-1"), hash_token("refresh-2"), at(60))
        assert ok.status == "ok"
        reused = await store.rotate_refresh_token(
            pool, hash_token("refresh-1"), hash_token("refresh-x"), at(90)
        )
        assert (reused.status, reused.session_id) == ("reused", "sess-1")
        assert await drain(queue, 1) == ["sess-1"]
    session = await store.get_session(pool, "sess-1")
    assert session is not None
    assert (session.revoked_at, session.revoked_reason) == (at(90), REFRESH_TOKEN_REUSE)
    # The legitimate holder's newer token dies with the session.
    after = await store.rotate_refresh_token(pool, hash_token("refresh-2"), hash_token("refresh-3"), at(120))
    assert after.status == "invalid"
    assert await store.session_id_for_refresh_token(pool, hash_token("refresh-x")) is None


async def test_two_concurrent_uses_of_one_refresh_token_are_one_ok_and_one_reuse(pool: Pool) -> None:
    """Racing one refresh token twice gives one rotation and one reuse, which revokes the session."""
    await new_session(pool)
    results = await asyncio.gather(
        store.rotate_refresh_token(pool, hash_token("refresh-1"), hash_token("a"), at(60)),
        store.rotate_refresh_token(pool, hash_token("refresh-1"), hash_token("b"), at(60)),
    )
    assert sorted(r.status for r in results) == ["ok", "reused"]
    session = await store.get_session(pool, "sess-1")
    assert session is not None and session.revoked_reason == REFRESH_TOKEN_REUSE


async def test_rotation_is_invalid_for_unknown_tokens_and_dead_sessions(pool: Pool) -> None:
    """Unknown tokens, revoked sessions and expired sessions all get invalid, without spending the token."""
    assert (await store.rotate_refresh_token(pool, hash_token("?"), hash_token("n"), NOW)).status == "invalid"
    await new_session(pool, "sess-short", refresh="short", lifetime=timedelta(hours=1))
    expired = await store.rotate_refresh_token(pool, hash_token("short"), hash_token("n1"), at(3600))
    assert (expired.status, expired.session_id) == ("invalid", "sess-short")
    await new_session(pool, "sess-revoked", refresh="revoked")
    assert await store.revoke_session(pool, "sess-revoked", "admin_revoke", at(1))
    assert (
        await store.rotate_refresh_token(pool, hash_token("revoked"), hash_token("n2"), at(2))
    ).status == ("invalid")
    used = await pool.fetchval("SELECT count(*) FROM refresh_tokens WHERE used_at IS NOT NULL")
    assert used == 0


async def test_a_refresh_updates_groups_and_the_idp_token_of_an_active_session_only(pool: Pool) -> None:
    """A refresh replaces groups, keeps the IdP token when given None, and is refused for dead sessions."""
    await new_session(pool)
    updated = await store.update_session_after_refresh(pool, "sess-1", ["eng"], None, at(60))
    assert updated is not None
    assert (updated.groups, updated.last_refresh_at) == (("eng",), at(60))
    assert updated.idp_refresh_token_enc == b"\x01sealed-idp-token"
    replaced = await store.update_session_after_refresh(pool, "sess-1", [], b"\x01new", at(120))
    assert replaced is not None and (replaced.groups, replaced.idp_refresh_token_enc) == ((), b"\x01new")
    assert replaced.expires_at == NOW + LIFETIME  # the absolute lifetime does not move
    assert await store.revoke_session(pool, "sess-1", "admin_revoke", at(130))
    assert await store.update_session_after_refresh(pool, "sess-1", ["eng"], None, at(140)) is None


async def test_issue_refresh_token_only_for_active_sessions(pool: Pool) -> None:
    """A refresh token can be added to an active session but not to a revoked or unknown one."""
    await new_session(pool)
    assert await store.issue_refresh_token(pool, "sess-1", hash_token("extra"), at(1))
    assert not await store.issue_refresh_token(pool, "nope", hash_token("extra-2"), at(1))
    assert await store.revoke_session(pool, "sess-1", "admin_revoke", at(2))
    assert not await store.issue_refresh_token(pool, "sess-1", hash_token("extra-3"), at(3))


# --- revocation -----------------------------------------------------------------------------------


async def test_revoking_one_session_notifies_once_and_only_the_first_time(pool: Pool, clean_db: str) -> None:
    """revoke_session NOTIFYs the id once; revoking again returns False and keeps the first reason."""
    await new_session(pool)
    async with notifications(clean_db) as queue:
        assert await store.revoke_session(pool, "sess-1", "rfc7009", at(5))
        assert not await store.revoke_session(pool, "sess-1", "admin_revoke", at(6))
        assert not await store.revoke_session(pool, "no-such-session", "admin_revoke", at(6))
        assert await drain(queue, 1) == ["sess-1"]
        await asyncio.sleep(0.2)
        assert queue.empty()
    session = await store.get_session(pool, "sess-1")
    assert session is not None and (session.revoked_at, session.revoked_reason) == (at(5), "rfc7009")


async def test_revoking_by_user_takes_every_active_session_of_that_email(pool: Pool, clean_db: str) -> None:
    """Revoking by email ignores case, skips others and dead sessions, and NOTIFYs each id."""
    await new_session(pool, "ada-1", refresh="r1")
    await new_session(pool, "ada-2", refresh="r2", idp_sid="idp-sid-2")
    await new_session(pool, "ada-old", refresh="r3", lifetime=timedelta(seconds=10))
    await new_session(pool, "bob-1", refresh="r4", email="bob@example.com", sub="00u-bob")
    async with notifications(clean_db) as queue:
        revoked = await store.revoke_sessions_for_user(pool, "Ada@Example.COM", "admin_revoke", at(60))
        assert revoked == ["ada-1", "ada-2"]
        assert await drain(queue, 2) == ["ada-1", "ada-2"]
    assert [s.id for s in await store.list_sessions(pool, now=at(60))] == ["bob-1"]


async def test_revoking_by_idp_sid_takes_only_that_idp_session(pool: Pool, clean_db: str) -> None:
    """A logout naming a sid revokes that IdP session only, and nothing when its sub does not match."""
    await new_session(pool, "s1", refresh="r1", idp_sid="idp-A")
    await new_session(pool, "s2", refresh="r2", idp_sid="idp-B")
    assert (
        await store.revoke_sessions_by_idp(pool, sub="00u-eve", idp_sid="idp-A", reason="x", now=at(1)) == []
    )
    async with notifications(clean_db) as queue:
        revoked = await store.revoke_sessions_by_idp(
            pool, sub="00u-ada", idp_sid="idp-A", reason="backchannel_logout", now=at(2)
        )
        assert revoked == ["s1"]
        assert await drain(queue, 1) == ["s1"]
    assert await store.revoked_session_ids(pool, at(3)) == {"s1"}
    assert await store.revoke_sessions_by_idp(pool, sub=None, idp_sid="idp-B", reason="x", now=at(4)) == [
        "s2"
    ]


async def test_revoking_by_sub_takes_all_of_that_subjects_sessions(pool: Pool) -> None:
    """A back-channel logout naming only a sub revokes every session of that subject."""
    await new_session(pool, "s1", refresh="r1", idp_sid="idp-A")
    await new_session(pool, "s2", refresh="r2", idp_sid=None)
    await new_session(pool, "s3", refresh="r3", sub="00u-bob", email="bob@example.com")
    revoked = await store.revoke_sessions_by_idp(
        pool, sub="00u-ada", idp_sid=None, reason="backchannel_logout", now=at(1)
    )
    assert revoked == ["s1", "s2"]
    with pytest.raises(ValueError):
        await store.revoke_sessions_by_idp(pool, sub=None, idp_sid=None, reason="x", now=at(1))


async def test_the_revoked_set_holds_revoked_sessions_until_they_expire(pool: Pool) -> None:
    """revoked_session_ids lists revoked, unexpired sessions only."""
    await new_session(pool, "long", refresh="r1")
    await new_session(pool, "short", refresh="r2", lifetime=timedelta(hours=1))
    await new_session(pool, "live", refresh="r3")
    assert await store.revoke_session(pool, "long", "admin_revoke", at(1))
    assert await store.revoke_session(pool, "short", "admin_revoke", at(1))
    assert await store.revoked_session_ids(pool, at(2)) == {"long", "short"}
    assert await store.revoked_session_ids(pool, at(3600)) == {"long"}


async def test_list_sessions_filters_by_email_and_activity(pool: Pool) -> None:
    """list_sessions filters by email ignoring case, with or without revoked and expired sessions."""
    await new_session(pool, "a", refresh="r1")
    await new_session(pool, "b", refresh="r2", email="bob@example.com", sub="00u-bob")
    await new_session(pool, "c", refresh="r3")
    assert await store.revoke_session(pool, "c", "admin_revoke", at(1))
    assert [s.id for s in await store.list_sessions(pool, "ADA@example.com", now=at(2))] == ["a"]
    assert sorted(s.id for s in await store.list_sessions(pool, "ada@example.com", active_only=False)) == [
        "a",
        "c",
    ]
    assert sorted(s.id for s in await store.list_sessions(pool, now=at(2))) == ["a", "b"]


# --- audit, logout replay, pruning --------------------------------------------------------------


async def test_audit_events_round_trip_newest_first(pool: Pool) -> None:
    """Audit rows read back with every field, newest first, optionally of one kind."""
    first = await store.audit(pool, kind="callback", outcome="denied", reason="state_mismatch", now=at(1))
    second = await store.audit(
        pool,
        kind="refresh",
        outcome="ok",
        email="ada@example.com",
        session_id="sess-1",
        client_ip="192.0.2.7",
        user_agent="claude-cli/2.1.0",
        detail={"groups": ["eng"], "n": 1},
    )
    events = await store.recent_audit(pool, 10)
    assert [e.id for e in events] == [second, first]
    assert events[1] == store.AuditEvent(
        id=first,
        at=at(1),
        kind="callback",
        outcome="denied",
        reason="state_mismatch",
        email=None,
        session_id=None,
        client_ip=None,
        user_agent=None,
        detail=None,
    )
    assert (events[0].email, events[0].session_id, events[0].detail) == (
        "ada@example.com",
        "sess-1",
        {"groups": ["eng"], "n": 1},
    )
    assert [e.id for e in await store.recent_audit(pool, 10, kind="callback")] == [first]
    assert len(await store.recent_audit(pool, 1)) == 1


async def logout(
    pool: Pool,
    entry: str,
    jti: str,
    *,
    iss: str = "https://idp.example.com",
    sub: str | None = "00u-ada",
    sid: str | None = None,
    accepted: float = 10,
    expires: float = 310,
    now: float | None = None,
) -> store.LogoutResult:
    return await store.record_backchannel_logout(
        pool,
        entry=entry,
        issuer=iss,
        jti=jti,
        jti_expires_at=at(expires),
        sub=sub,
        idp_sid=sid,
        accepted_at=at(accepted),
        reason="backchannel_logout",
        now=at(accepted if now is None else now),
        client_ip="192.0.2.9",
        user_agent="idp/1",
        detail={"spooled": True},
    )


async def test_a_logout_revokes_once_and_knows_its_own_entry_from_a_replay(pool: Pool, clean_db: str) -> None:
    """Writing a logout revokes its sessions with one audit row; the same entry again is
    already_applied, another entry with that jti is a replay, another issuer's jti is new."""
    await new_session(pool, "s1", refresh="r1", idp_sid="idp-A")
    await new_session(pool, "s2", refresh="r2", idp_sid="idp-B")
    async with notifications(clean_db) as queue:
        first = await logout(pool, "e1", "j1", sid="idp-A")
        assert first == store.LogoutResult("applied", ("s1",))
        assert await drain(queue, 1) == ["s1"]
    rows = await store.recent_audit(pool, 10, kind="backchannel_logout")
    assert [(r.outcome, r.session_id, r.client_ip, r.user_agent, r.detail) for r in rows] == [
        ("ok", "s1", "192.0.2.9", "idp/1", {"sessions": 1, "by": "sid", "spooled": True})
    ]
    # The entry's first write committed but its file outlived it: written again, nothing happens.
    assert await logout(pool, "e1", "j1", sid="idp-A", now=60) == store.LogoutResult("already_applied")
    assert await logout(pool, "e2", "j1", sid="idp-B", now=60) == store.LogoutResult("replay")
    assert await logout(pool, "e3", "j1", iss="https://other.example", sid="idp-B") == store.LogoutResult(
        "applied", ("s2",)
    )
    assert len(await store.recent_audit(pool, 10, kind="backchannel_logout")) == 2
    # Once the token could no longer pass validation its jti is forgotten.
    assert await logout(pool, "e4", "j1", sid="idp-B", now=400) == store.LogoutResult("applied", ())


async def test_a_logout_by_sub_spares_sign_ins_made_after_it(pool: Pool) -> None:
    """A logout naming only the sub, written late, revokes the sessions signed in by the time it
    arrived and not those signed in since; one naming the IdP sid has no such bound."""
    await new_session(pool, "before", refresh="r1", idp_sid="idp-A", created=at(0))
    await new_session(pool, "after", refresh="r2", idp_sid="idp-A", created=at(20))
    assert await logout(pool, "e1", "j1", accepted=10, now=30) == store.LogoutResult("applied", ("before",))
    assert await logout(pool, "e2", "j2", sid="idp-A", accepted=10, now=30) == store.LogoutResult(
        "applied", ("after",)
    )


async def test_prune_removes_expired_sign_in_state_and_old_sessions(pool: Pool) -> None:
    """Pruning deletes expired device codes, auth requests and jtis, and long-expired sessions."""
    await new_device(pool)
    await new_auth_request(pool)
    await new_session(pool, "old", refresh="r1", lifetime=timedelta(days=1))
    await new_session(pool, "live", refresh="r2")
    assert (await logout(pool, "e", "j", sub="00u-nobody", accepted=0, expires=60)).status == "applied"
    assert await store.prune_expired(pool, at(1), keep_sessions=timedelta(days=1)) == 0
    # device code + auth request + jti + the old session (its refresh token goes with it).
    assert await store.prune_expired(pool, NOW + timedelta(days=2), keep_sessions=timedelta(days=1)) == 4
    assert [s.id for s in await store.list_sessions(pool, active_only=False)] == ["live"]
    assert await store.session_id_for_refresh_token(pool, hash_token("r1")) is None
