"""The Claude Code settings that point it at the gateway (pure: no files, no environment).

Three formats, each a handful of environment variables plus ``apiKeyHelper`` set to
``authz token --gateway URL`` (``~/.claude/settings.json`` takes both: the helper as
``apiKeyHelper``, the variables in its ``env`` object):

* ``messages``: ``ANTHROPIC_BASE_URL`` is the gateway and Claude Code speaks the Anthropic
  Messages API to it, sending the helper's output as both ``x-api-key`` and
  ``Authorization: Bearer``. Where the gateway is reachable over https (or on loopback) Claude
  Code's own sign-in is better still: ``/login``, "Cloud gateway", then the gateway URL; it needs
  no helper and takes the gateway's managed settings (:func:`native_login`).
* ``bedrock`` and ``vertex``: the cloud's wire format with cloud authentication skipped; the
  helper's output arrives as ``Authorization: Bearer`` (DESIGN.md, Client contracts).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Format = Literal["messages", "bedrock", "vertex"]
FORMATS: tuple[Format, ...] = ("messages", "bedrock", "vertex")

DEFAULT_BEDROCK_REGION = "us-east-1"
DEFAULT_VERTEX_REGION = "us-east5"
# The gateway sends Vertex requests to its own configured project (backends/vertex.py), but
# Claude Code insists on a project id to build its URLs.
DEFAULT_VERTEX_PROJECT = "claude-gateway"

# Variables that select another format or another credential. They are removed from the
# settings' env when writing, and the user is told to unset them in the shell:
# AWS_BEARER_TOKEN_BEDROCK replaces the apiKeyHelper's token in Bedrock format (DESIGN.md), and
# ANTHROPIC_AUTH_TOKEN and ANTHROPIC_API_KEY come before apiKeyHelper in Claude Code's order of
# credentials.
_CONFLICTING: Mapping[Format, tuple[str, ...]] = {
    "messages": (
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_API_KEY",
        "CLAUDE_CODE_USE_BEDROCK",
        "ANTHROPIC_BEDROCK_BASE_URL",
        "CLAUDE_CODE_SKIP_BEDROCK_AUTH",
        "CLAUDE_CODE_USE_VERTEX",
        "ANTHROPIC_VERTEX_BASE_URL",
        "CLAUDE_CODE_SKIP_VERTEX_AUTH",
    ),
    "bedrock": (
        "AWS_BEARER_TOKEN_BEDROCK",
        "CLAUDE_CODE_USE_VERTEX",
        "ANTHROPIC_VERTEX_BASE_URL",
        "CLAUDE_CODE_SKIP_VERTEX_AUTH",
    ),
    "vertex": ("CLAUDE_CODE_USE_BEDROCK", "ANTHROPIC_BEDROCK_BASE_URL", "CLAUDE_CODE_SKIP_BEDROCK_AUTH"),
}
# What the printed instructions ask the user to unset in their shell, and why.
_UNSET: Mapping[Format, tuple[str, ...]] = {
    "messages": (
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_API_KEY",
        "CLAUDE_CODE_USE_BEDROCK",
        "CLAUDE_CODE_USE_VERTEX",
    ),
    "bedrock": ("AWS_BEARER_TOKEN_BEDROCK",),
    "vertex": (),
}
_REPLACES_TOKEN = "it would replace the gateway token"  # noqa: S105 -- a sentence, not a secret
UNSET_REASONS: Mapping[str, str] = {
    "AWS_BEARER_TOKEN_BEDROCK": _REPLACES_TOKEN,
    "ANTHROPIC_AUTH_TOKEN": _REPLACES_TOKEN,
    "ANTHROPIC_API_KEY": _REPLACES_TOKEN,
    "CLAUDE_CODE_USE_BEDROCK": "it would switch Claude Code to Bedrock format",
    "CLAUDE_CODE_USE_VERTEX": "it would switch Claude Code to Vertex format",
}

_TITLES: Mapping[Format, str] = {
    "messages": "Anthropic Messages API",
    "bedrock": "Bedrock",
    "vertex": "Vertex",
}


def native_login(gateway: str) -> str:
    """How to sign Claude Code in with its own gateway sign-in, as comment lines."""
    return (
        "# Preferred when the gateway is reachable over https (or on this machine): Claude Code's own\n"
        '# sign-in. In Claude Code run /login, choose "Cloud gateway" and enter\n'
        f"#   {gateway}\n"
        "# It signs in through your company's IdP, refreshes its own token and applies the gateway's\n"
        "# managed settings: no apiKeyHelper, no environment variables, no `authz` on this machine.\n"
    )


class SetupError(ValueError):
    """The setup arguments do not make sense together (the message says which)."""


@dataclass(frozen=True, slots=True)
class ClaudeCodeSettings:
    """What Claude Code needs: environment variables, the apiKeyHelper command, and what to unset."""

    format: Format
    gateway: str
    env: tuple[tuple[str, str], ...]
    api_key_helper: str
    login_command: str
    unset: tuple[str, ...]

    def env_dict(self) -> dict[str, str]:
        """The environment variables as a dict, in the order Claude Code's docs list them."""
        return dict(self.env)


def helper_command(authz: Sequence[str], gateway: str) -> str:
    """The ``apiKeyHelper`` shell command: ``authz`` (argv to run this CLI) + ``token --gateway URL``."""
    return shlex.join([*authz, "token", "--gateway", gateway])


def claude_code_settings(
    gateway: str,
    fmt: str,
    *,
    authz: Sequence[str],
    region: str | None = None,
    project: str | None = None,
) -> ClaudeCodeSettings:
    """The settings for ``gateway`` (a normalised URL) in format ``fmt`` (``messages``, ``bedrock``
    or ``vertex``).

    ``authz`` is the command line that runs this CLI, ideally one absolute path.
    """
    gateway = gateway.rstrip("/")
    env: list[tuple[str, str]]
    chosen: Format
    if fmt == "messages":
        chosen = "messages"
        if project is not None or region is not None:
            raise SetupError("--region and --project apply to --format bedrock or vertex only")
        env = [("ANTHROPIC_BASE_URL", gateway)]
    elif fmt == "bedrock":
        chosen = "bedrock"
        if project is not None:
            raise SetupError("--project applies to --format vertex only")
        env = [
            ("CLAUDE_CODE_USE_BEDROCK", "1"),
            ("ANTHROPIC_BEDROCK_BASE_URL", gateway),
            ("CLAUDE_CODE_SKIP_BEDROCK_AUTH", "1"),
            ("AWS_REGION", region or DEFAULT_BEDROCK_REGION),
        ]
    elif fmt == "vertex":
        chosen = "vertex"
        env = [
            ("CLAUDE_CODE_USE_VERTEX", "1"),
            ("ANTHROPIC_VERTEX_BASE_URL", f"{gateway}/v1"),
            ("CLAUDE_CODE_SKIP_VERTEX_AUTH", "1"),
            ("ANTHROPIC_VERTEX_PROJECT_ID", project or DEFAULT_VERTEX_PROJECT),
            ("CLOUD_ML_REGION", region or DEFAULT_VERTEX_REGION),
        ]
    else:
        raise SetupError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return ClaudeCodeSettings(
        format=chosen,
        gateway=gateway,
        env=tuple(env),
        api_key_helper=helper_command(authz, gateway),
        login_command=shlex.join([*authz, "login", "--gateway", gateway]),
        unset=_UNSET[chosen],
    )


def settings_fragment(settings: ClaudeCodeSettings) -> dict[str, object]:
    """The ``~/.claude/settings.json`` keys these settings set."""
    return {"apiKeyHelper": settings.api_key_helper, "env": settings.env_dict()}


def render(settings: ClaudeCodeSettings, *, settings_path: str = "~/.claude/settings.json") -> str:
    """Human-readable instructions: shell exports, what to unset, and the settings.json fragment
    (for the Messages format, Claude Code's own sign-in first, as the preferred way)."""
    title = _TITLES[settings.format]
    lines = [f"# Claude Code, {title} format, through the gateway at {settings.gateway}", ""]
    if settings.format == "messages":
        lines += [native_login(settings.gateway).rstrip("\n"), ""]
        lines.append("# Otherwise (or for scripts and the SDKs), with apiKeyHelper. Either in your shell:")
    else:
        lines.append("# Either in your shell:")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in settings.env]
    lines += [f"unset {name}  # {UNSET_REASONS[name]}" for name in settings.unset]
    lines += ["", f"# and in {settings_path} (`--write` merges all of this into it, env included):"]
    lines.append(json.dumps(settings_fragment(settings), indent=2))
    lines += ["", f"# Sign in first: {settings.login_command}"]
    return "\n".join(lines) + "\n"


def merge_settings(existing: Mapping[str, object], settings: ClaudeCodeSettings) -> dict[str, object]:
    """``existing`` settings.json content with ``apiKeyHelper`` and ``env`` merged in.

    Other keys are kept; in ``env`` the gateway's variables are set, variables that would select
    the other format or replace the gateway token are dropped, and the rest are kept.
    """
    merged = dict(existing)
    old_env = existing.get("env")
    if old_env is not None and not isinstance(old_env, Mapping):
        raise SetupError('the existing settings have an "env" that is not an object; fix it first')
    env: dict[str, object] = {
        key: value for key, value in (old_env or {}).items() if key not in _CONFLICTING[settings.format]
    }
    env.update(settings.env_dict())
    merged["apiKeyHelper"] = settings.api_key_helper
    merged["env"] = env
    return merged
