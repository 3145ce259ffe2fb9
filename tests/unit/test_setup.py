"""The Claude Code settings for a gateway: environment, apiKeyHelper, rendering and merging."""

from __future__ import annotations

import json

import pytest

from authz.client.setup import SetupError, claude_code_settings, merge_settings, render

GW = "https://gw.example"
AUTHZ = ("/opt/claude gateway/bin/authz",)


def test_bedrock_settings() -> None:
    """Bedrock format: base URL, skip-auth, default region, and AWS_BEARER_TOKEN_BEDROCK to unset."""
    settings = claude_code_settings(GW + "/", "bedrock", authz=AUTHZ)
    assert settings.env_dict() == {
        "CLAUDE_CODE_USE_BEDROCK": "1",
        "ANTHROPIC_BEDROCK_BASE_URL": GW,
        "CLAUDE_CODE_SKIP_BEDROCK_AUTH": "1",
        "AWS_REGION": "us-east-1",
    }
    assert settings.unset == ("AWS_BEARER_TOKEN_BEDROCK",)
    assert settings.api_key_helper == f"'/opt/claude gateway/bin/authz' token --gateway {GW}"


def test_vertex_settings() -> None:
    """Vertex format: base URL with /v1, skip-auth, project and region (given or defaulted)."""
    settings = claude_code_settings(GW, "vertex", authz=("/usr/bin/authz",), project="acme", region="global")
    assert settings.env_dict() == {
        "CLAUDE_CODE_USE_VERTEX": "1",
        "ANTHROPIC_VERTEX_BASE_URL": f"{GW}/v1",
        "CLAUDE_CODE_SKIP_VERTEX_AUTH": "1",
        "ANTHROPIC_VERTEX_PROJECT_ID": "acme",
        "CLOUD_ML_REGION": "global",
    }
    assert settings.unset == ()
    defaults = claude_code_settings(GW, "vertex", authz=("/usr/bin/authz",)).env_dict()
    assert defaults["CLOUD_ML_REGION"] == "us-east5" and defaults["ANTHROPIC_VERTEX_PROJECT_ID"]


def test_bad_arguments_are_refused() -> None:
    """An unknown format, or --project with bedrock, is a SetupError."""
    with pytest.raises(SetupError, match="unknown format"):
        claude_code_settings(GW, "azure", authz=AUTHZ)
    with pytest.raises(SetupError, match="--project"):
        claude_code_settings(GW, "bedrock", authz=AUTHZ, project="acme")


def test_render_shows_exports_unset_and_the_settings_fragment() -> None:
    """The text has the exports, the unset reminder, a parseable settings.json fragment and the login."""
    settings = claude_code_settings(GW, "bedrock", authz=("/usr/bin/authz",), region="eu-west-1")
    text = render(settings)
    assert "export CLAUDE_CODE_USE_BEDROCK=1\n" in text
    assert f"export ANTHROPIC_BEDROCK_BASE_URL={GW}\n" in text
    assert "export AWS_REGION=eu-west-1\n" in text
    assert "unset AWS_BEARER_TOKEN_BEDROCK" in text
    assert f"/usr/bin/authz login --gateway {GW}" in text
    fragment = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert fragment == {"apiKeyHelper": f"/usr/bin/authz token --gateway {GW}", "env": settings.env_dict()}


def test_merge_keeps_other_keys_and_drops_conflicting_variables() -> None:
    """Merging keeps unrelated settings and env entries, sets ours, and drops ones that would conflict."""
    existing = {
        "model": "opus",
        "permissions": {"allow": ["Bash(ls)"]},
        "apiKeyHelper": "old-helper",
        "env": {"EDITOR": "vim", "AWS_BEARER_TOKEN_BEDROCK": "leak", "CLAUDE_CODE_USE_VERTEX": "1"},
    }
    settings = claude_code_settings(GW, "bedrock", authz=("/usr/bin/authz",))
    merged = merge_settings(existing, settings)
    assert merged["model"] == "opus" and merged["permissions"] == {"allow": ["Bash(ls)"]}
    assert merged["apiKeyHelper"] == settings.api_key_helper
    assert merged["env"] == {"EDITOR": "vim", **settings.env_dict()}
    assert existing["apiKeyHelper"] == "old-helper"  # the input is not modified


def test_merge_refuses_an_env_that_is_not_an_object() -> None:
    """A settings file whose env is not an object is not silently overwritten."""
    settings = claude_code_settings(GW, "vertex", authz=AUTHZ)
    with pytest.raises(SetupError, match="env"):
        merge_settings({"env": ["A=1"]}, settings)


def test_messages_settings() -> None:
    """Messages format: ANTHROPIC_BASE_URL and the helper; credentials that would win over it are unset."""
    settings = claude_code_settings(GW + "/", "messages", authz=AUTHZ)
    assert settings.env_dict() == {"ANTHROPIC_BASE_URL": GW}
    assert settings.api_key_helper == f"'/opt/claude gateway/bin/authz' token --gateway {GW}"
    assert {"ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_API_KEY"} <= set(settings.unset)
    with pytest.raises(SetupError, match="--region and --project"):
        claude_code_settings(GW, "messages", authz=AUTHZ, region="us-east-1")


def test_messages_render_puts_the_native_login_first() -> None:
    """The Messages text recommends /login ("Cloud gateway") first, then the export and helper fragment."""
    text = render(claude_code_settings(GW, "messages", authz=("/usr/bin/authz",)))
    assert text.index('choose "Cloud gateway"') < text.index(f"export ANTHROPIC_BASE_URL={GW}\n")
    assert f"#   {GW}\n" in text
    assert "unset ANTHROPIC_API_KEY  # it would replace the gateway token" in text
    assert "CLAUDE_CODE_USE_BEDROCK=" not in text and "AWS_REGION" not in text
    fragment = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert fragment == {
        "apiKeyHelper": f"/usr/bin/authz token --gateway {GW}",
        "env": {"ANTHROPIC_BASE_URL": GW},
    }


def test_merging_messages_drops_the_cloud_formats_and_competing_credentials() -> None:
    """Switching to the Messages format drops the Bedrock/Vertex selectors and keys that beat the helper."""
    existing = {
        "env": {
            "CLAUDE_CODE_USE_BEDROCK": "1",
            "ANTHROPIC_BEDROCK_BASE_URL": GW,
            "CLAUDE_CODE_SKIP_BEDROCK_AUTH": "1",
            "ANTHROPIC_API_KEY": "sk-old",
            "AWS_REGION": "us-east-1",
        }
    }
    merged = merge_settings(existing, claude_code_settings(GW, "messages", authz=AUTHZ))
    assert merged["env"] == {"AWS_REGION": "us-east-1", "ANTHROPIC_BASE_URL": GW}
