"""Sign-in pages: inputs are escaped, nothing is scripted or loaded, forms post to the portal only."""

from __future__ import annotations

import re
from collections.abc import Callable
from html import escape

import pytest

from authz.signin.portal import pages

EVIL = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>&amp;"

BUILDERS: dict[str, Callable[[str], str]] = {
    "device": lambda v: pages.device_page(user_code=v, csrf=v, error=v),
    "approval": lambda v: pages.approval_page(surface=v, email=v, user_code=v, approval_id=v, csrf=v),
    "done": lambda v: pages.done_page(email=v),
    "denied": lambda v: pages.denied_page(),
    "error": lambda v: pages.error_page(v, v),
    "rate_limited": lambda v: pages.rate_limited_page(7),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pages_escape_their_inputs(name: str) -> None:
    """No input reaches a page unescaped: no tag, attribute break-out or raw entity survives."""
    html = BUILDERS[name](EVIL)
    assert "<script" not in html.lower()
    assert "<img" not in html.lower()
    assert "\"'>" not in html
    assert EVIL not in html
    if name not in ("denied", "rate_limited"):
        assert escape(EVIL, quote=True) in html


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pages_are_self_contained(name: str) -> None:
    """Pages have no scripts, event handlers, external assets or frames, and declare a language."""
    html = BUILDERS[name]("value")
    lowered = html.lower()
    assert html.startswith("<!DOCTYPE html>")
    assert '<html lang="en">' in html
    for forbidden in ("<script", "<iframe", "<link", "<img", "src=", "http://", "https://", "javascript:"):
        assert forbidden not in lowered
    assert not re.search(r"\son[a-z]+=", lowered)
    for action in re.findall(r'action="([^"]*)"', html):
        assert action in ("/device", "/device/approve")


def test_device_page_prefills_but_never_submits() -> None:
    """A pre-filled code sits in a labelled field with the CSRF token; nothing submits it for the user."""
    html = pages.device_page(user_code="WDJB-MJHT", csrf="tok", error=None)
    assert 'value="WDJB-MJHT"' in html
    assert '<label for="user_code">' in html
    assert 'name="csrf" value="tok"' in html
    assert 'method="post"' in html
    assert "autofocus" not in html
    assert 'role="alert"' not in html


def test_device_page_shows_errors_as_alerts() -> None:
    """An error is announced to assistive technology."""
    html = pages.device_page(user_code="", csrf="t", error="That code is not valid.")
    assert '<p class="error" role="alert">That code is not valid.</p>' in html


def test_approval_page_names_surface_email_and_code() -> None:
    """The approval question names the client, the account and the code, with both choices."""
    html = pages.approval_page(
        surface="claude_code", email="ada@example.com", user_code="WDJB-MJHT", approval_id="ap1", csrf="c"
    )
    text = re.sub(r"<[^>]+>", "", html)
    assert "Approve sign-in of Claude Code as ada@example.com for code WDJB-MJHT?" in text
    assert 'name="decision" value="approve"' in html
    assert 'name="decision" value="deny"' in html
    assert 'name="approval_id" value="ap1"' in html


def test_escaping_example() -> None:
    """Markup in an e-mail address is shown as text."""
    html = pages.done_page(email="<b>ada</b>@example.com")
    assert "&lt;b&gt;ada&lt;/b&gt;@example.com" in html
    assert "You can close this window" in html


def test_surface_label() -> None:
    """Known surfaces get a friendly name; unknown ones are shown as sent; none gets a generic label."""
    assert pages.surface_label("claude_code") == "Claude Code"
    assert pages.surface_label("vim") == "vim"
    assert pages.surface_label(None) == "a command-line client"
