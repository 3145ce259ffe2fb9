"""Pure HTML builders for the sign-in pages.

Every value that reaches a page passes through :func:`html.escape` (attribute and text context
alike, quotes included). The pages carry no scripts and load nothing: the only style is an inline
``<style>`` element, which the portal's Content-Security-Policy allows and nothing else (see
``authz/signin/portal/web.py``). Forms post to the portal's own paths only.
"""

from __future__ import annotations

from html import escape

# Friendly names for the ``surface`` a client declares at device authorization.
SURFACES: dict[str, str] = {"claude_code": "Claude Code", "cli": "the authz command line"}

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0}
body{background:#f6f6f4;color:#1f1f1f}
main{max-width:32rem;margin:4rem auto;padding:2rem;background:#fff;border:1px solid #ddd;border-radius:8px}
h1{font-size:1.4rem;margin-top:0}
label{display:block;font-weight:600;margin-bottom:.4rem}
input[type=text]{font:1.4rem ui-monospace,monospace;letter-spacing:.15em;padding:.4rem;width:12ch}
button{font-size:1rem;padding:.5rem 1.2rem;margin:1rem .5rem 0 0;cursor:pointer}
.error{color:#a40000;border-left:4px solid #a40000;padding-left:.6rem}
.code{font-family:ui-monospace,monospace;letter-spacing:.1em;font-weight:700}
""".strip()


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def surface_label(surface: str | None) -> str:
    """A human name for a client surface (``claude_code`` -> ``Claude Code``); unescaped text."""
    if not surface:
        return "a command-line client"
    return SURFACES.get(surface, surface)


def layout(title: str, body: str) -> str:
    """Wrap already-escaped ``body`` HTML in a minimal accessible page titled ``title``."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        f"<title>{_e(title)} · Claude gateway</title>"
        f"<style>{_STYLE}</style></head>"
        f"<body><main><h1>{_e(title)}</h1>{body}</main></body></html>\n"
    )


def _error(message: str | None) -> str:
    return f'<p class="error" role="alert">{_e(message)}</p>' if message else ""


def device_page(*, user_code: str, csrf: str, error: str | None = None) -> str:
    """The verification page: a form to enter, or confirm, the code shown by the client.

    A pre-filled code is only placed in the field; the user still has to press the button
    (RFC 8628 §5.4: a ``verification_uri_complete`` link must not approve by itself).
    """
    body = (
        f"{_error(error)}"
        "<p>Enter the code shown in your terminal, then sign in with your company account.</p>"
        '<form method="post" action="/device">'
        '<label for="user_code">Code</label>'
        f'<input type="text" id="user_code" name="user_code" value="{_e(user_code)}" required '
        'maxlength="12" autocomplete="off" autocapitalize="characters" spellcheck="false" '
        'aria-describedby="code-help">'
        '<p id="code-help">It looks like <span class="code">WDJB-MJHT</span>.</p>'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<button type="submit">Continue</button>'
        "</form>"
    )
    return layout("Sign in to the Claude gateway", body)


def approval_page(*, surface: str | None, email: str, user_code: str, approval_id: str, csrf: str) -> str:
    """Ask the signed-in user to approve (or deny) the sign-in of the device showing ``user_code``."""
    body = (
        f"<p>Approve sign-in of <strong>{_e(surface_label(surface))}</strong> as "
        f'<strong>{_e(email)}</strong> for code <span class="code">{_e(user_code)}</span>?</p>'
        "<p>Only approve if you started this sign-in yourself and the code matches your terminal.</p>"
        '<form method="post" action="/device/approve">'
        f'<input type="hidden" name="approval_id" value="{_e(approval_id)}">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
        '<button type="submit" name="decision" value="approve">Approve</button>'
        '<button type="submit" name="decision" value="deny">Deny</button>'
        "</form>"
    )
    return layout("Approve sign-in", body)


def done_page(*, email: str) -> str:
    """Shown after approval."""
    body = (
        f"<p>Signed in as <strong>{_e(email)}</strong>. Your terminal will continue by itself.</p>"
        "<p>You can close this window.</p>"
    )
    return layout("Signed in", body)


def denied_page() -> str:
    """Shown after the user denied the sign-in."""
    return layout(
        "Sign-in denied",
        "<p>The sign-in was denied; the client will not receive a token.</p>"
        "<p>You can close this window.</p>",
    )


def error_page(title: str, message: str) -> str:
    """A failure page: what went wrong and what to do, with a link back to the start."""
    body = f'{_error(message)}<p><a href="/device">Start again</a></p>'
    return layout(title, body)


def rate_limited_page(retry_after: int) -> str:
    """Shown when too many codes were tried from one address."""
    return error_page(
        "Too many attempts",
        f"Too many codes were tried from your network. Wait {retry_after} seconds and try again.",
    )
