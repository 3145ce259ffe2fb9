"""Translate the gateway's upstream configuration into the backends' settings objects.

``backends/`` knows nothing of the gateway's YAML; this is the one place the two meet.
"""

from __future__ import annotations

from authz.configtypes import Upstream
from backends.bedrock import AssumeRole, BedrockSettings, DefaultChain, StaticKeys
from backends.vertex import ApplicationDefault, ServiceAccountFile, VertexSettings


def backend_settings(name: str, upstream: Upstream) -> BedrockSettings | VertexSettings:
    """The backend settings for the upstream called ``name`` (config is already validated)."""
    creds = upstream.credentials
    model_map = dict(upstream.model_map)
    if upstream.kind == "bedrock":
        bedrock_creds: StaticKeys | DefaultChain | AssumeRole
        if creds.source == "static":
            bedrock_creds = StaticKeys(
                access_key_id=creds.access_key_id or "",
                secret_access_key=creds.secret_access_key or "",
                session_token=creds.session_token,
            )
        elif creds.source == "assume_role":
            source: StaticKeys | DefaultChain = DefaultChain()
            if creds.access_key_id and creds.secret_access_key:
                source = StaticKeys(creds.access_key_id, creds.secret_access_key, creds.session_token)
            bedrock_creds = AssumeRole(
                role_arn=creds.role_arn or "",
                external_id=creds.external_id,
                duration_seconds=creds.duration_seconds,
                source_credentials=source,
                sts_endpoint_url=creds.sts_endpoint_url,
                sts_region=creds.sts_region,
            )
        else:
            bedrock_creds = DefaultChain()
        return BedrockSettings(
            name=name,
            region=upstream.region,
            credentials=bedrock_creds,
            base_url=upstream.base_url,
            fips=upstream.fips,
            model_map=model_map,
        )
    vertex_creds: ApplicationDefault | ServiceAccountFile
    if creds.source == "service_account_file":
        vertex_creds = ServiceAccountFile(path=creds.path or "")
    else:
        vertex_creds = ApplicationDefault()
    return VertexSettings(
        name=name,
        project=upstream.project or "",
        region=upstream.region,
        credentials=vertex_creds,
        base_url=upstream.base_url,
        model_map=model_map,
    )
