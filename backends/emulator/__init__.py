"""Local stand-in for Bedrock, STS, Google OAuth, Vertex and the Anthropic API, strict enough for
boto3, google-auth and the anthropic SDK.

Start it in-process with ``start_emulator`` or as ``python -m backends.emulator``; steer it through
``EmulatorState`` or the ``/_emulator/*`` control endpoints.
"""

from backends.emulator.app import create_app, start_emulator
from backends.emulator.google import (
    CLOUD_PLATFORM_SCOPE,
    ServiceAccountPublicKey,
    generate_service_account_key,
    load_service_account_public_key,
)
from backends.emulator.state import (
    ACCOUNT_ID,
    DEFAULT_AWS_REGION,
    DEFAULT_PROJECT,
    DEFAULT_ROLE_ARN,
    DEFAULT_USAGE,
    TEST_ACCESS_KEY_ID,
    TEST_ANTHROPIC_API_KEY,
    TEST_PRINCIPAL_ARN,
    TEST_SECRET_ACCESS_KEY,
    AssumeRoleCall,
    EmulatorState,
    RecordedRequest,
    Scenario,
)

__all__ = [
    "ACCOUNT_ID",
    "CLOUD_PLATFORM_SCOPE",
    "DEFAULT_AWS_REGION",
    "DEFAULT_PROJECT",
    "DEFAULT_ROLE_ARN",
    "DEFAULT_USAGE",
    "TEST_ACCESS_KEY_ID",
    "TEST_ANTHROPIC_API_KEY",
    "TEST_PRINCIPAL_ARN",
    "TEST_SECRET_ACCESS_KEY",
    "AssumeRoleCall",
    "EmulatorState",
    "RecordedRequest",
    "Scenario",
    "ServiceAccountPublicKey",
    "create_app",
    "generate_service_account_key",
    "load_service_account_public_key",
    "start_emulator",
]
