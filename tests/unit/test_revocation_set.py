"""The revocation set's back-channel logouts: which access tokens an IdP-level logout blocks, and
when the set forgets it. Pure data, no sockets."""

from __future__ import annotations

from dataclasses import replace

from authz.signin.revocation import IdpLogout, RevocationSet
from authz.signin.tokens import Claims

AT = 1_800_000_000.0


def claims(**changes: object) -> Claims:
    base = Claims(
        sub="00u-ada",
        email="ada@example.com",
        groups=("eng",),
        sid="gw-1",
        iat=int(AT) - 60,
        exp=int(AT) + 840,
        jti="j",
        iss="https://gw.example",
        aud="claude-gateway",
        auth_time=int(AT) - 3600,
        idp_sid="idp-s1",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def logout(entry: str = "e1", *, sub: str | None = None, sid: str | None = None) -> IdpLogout:
    return IdpLogout(entry=entry, sub=sub, sid=sid, at=AT, hold_until=AT + 930)


def test_a_revoked_session_id_blocks_its_tokens() -> None:
    """The gateway session id alone blocks, as before back-channel logouts were held here."""
    revocations = RevocationSet({"gw-1"})
    assert revocations.blocks(claims())
    assert not revocations.blocks(claims(sid="gw-2"))


def test_a_logout_by_idp_session_blocks_that_session_whenever_it_signed_in() -> None:
    """A logout naming the IdP sid blocks the tokens carrying it (and its sub, when named), even of
    a session created after the logout; other IdP sessions and tokens without idp_sid pass."""
    revocations = RevocationSet()
    revocations.add_logout(logout(sid="idp-s1", sub="00u-ada"))
    assert revocations.blocks(claims())
    assert revocations.blocks(claims(auth_time=int(AT) + 5, sid="gw-late"))
    assert not revocations.blocks(claims(idp_sid="idp-s2"))
    assert not revocations.blocks(claims(idp_sid=None))
    assert not revocations.blocks(claims(sub="00u-eve"))
    revocations.add_logout(logout("e2", sid="idp-s2"))
    assert revocations.blocks(claims(idp_sid="idp-s2", sub="00u-anyone"))


def test_a_logout_by_subject_spares_sign_ins_made_after_it() -> None:
    """A logout naming only the sub blocks that subject's sessions signed in by the logout, not
    later sign-ins; without auth_time the token's iat stands in for it."""
    revocations = RevocationSet()
    revocations.add_logout(logout(sub="00u-ada"))
    assert revocations.blocks(claims(idp_sid=None))
    assert revocations.blocks(claims(auth_time=int(AT)))
    assert not revocations.blocks(claims(auth_time=int(AT) + 1))
    assert not revocations.blocks(claims(sub="00u-bob"))
    assert revocations.blocks(claims(auth_time=None, iat=int(AT) - 1))
    assert not revocations.blocks(claims(auth_time=None, iat=int(AT) + 1))
    assert revocations.logged_out("00u-ada", None, AT - 1)
    assert not revocations.logged_out("00u-ada", None, AT + 1)


def test_a_logout_is_held_while_pending_and_until_its_tokens_expire() -> None:
    """A logout stays while its journal entry is pending, whatever the time; written through, it
    is dropped once hold_until has passed; a resync of session ids never drops it."""
    revocations = RevocationSet()
    revocations.add_logout(logout(sub="00u-ada"))
    revocations.replace({"gw-9"})
    assert revocations.blocks(claims())
    revocations.settle_logouts({"e1"}, AT + 10_000)
    assert revocations.blocks(claims())
    assert [entry.pending for entry in revocations.logouts] == [True]
    revocations.settle_logouts(set(), AT + 10)
    assert [entry.pending for entry in revocations.logouts] == [False]
    assert revocations.blocks(claims())
    revocations.settle_logouts(set(), AT + 930)
    assert revocations.logouts == ()
    assert not revocations.blocks(claims())
    assert revocations.blocks(claims(sid="gw-9"))
