from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestContext(_message.Message):
    __slots__ = ("request_id", "started_at", "sub", "email", "groups", "session_id", "cc_session_id", "agent_id", "parent_agent_id", "user_agent", "client_format", "operation", "streaming", "upstream", "requested_model", "model", "upstream_model", "regional", "policy", "upstream_kind", "upstream_query", "request_bytes", "models", "chain")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    SUB_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CC_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_KIND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_QUERY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    started_at: float
    sub: str
    email: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    session_id: str
    cc_session_id: str
    agent_id: str
    parent_agent_id: str
    user_agent: str
    client_format: str
    operation: str
    streaming: bool
    upstream: str
    requested_model: str
    model: str
    upstream_model: str
    regional: bool
    policy: str
    upstream_kind: str
    upstream_query: str
    request_bytes: int
    models: ModelPatterns
    chain: _containers.RepeatedCompositeFieldContainer[ChainUpstream]
    def __init__(self, request_id: _Optional[str] = ..., started_at: _Optional[float] = ..., sub: _Optional[str] = ..., email: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ..., session_id: _Optional[str] = ..., cc_session_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., parent_agent_id: _Optional[str] = ..., user_agent: _Optional[str] = ..., client_format: _Optional[str] = ..., operation: _Optional[str] = ..., streaming: _Optional[bool] = ..., upstream: _Optional[str] = ..., requested_model: _Optional[str] = ..., model: _Optional[str] = ..., upstream_model: _Optional[str] = ..., regional: _Optional[bool] = ..., policy: _Optional[str] = ..., upstream_kind: _Optional[str] = ..., upstream_query: _Optional[str] = ..., request_bytes: _Optional[int] = ..., models: _Optional[_Union[ModelPatterns, _Mapping]] = ..., chain: _Optional[_Iterable[_Union[ChainUpstream, _Mapping]]] = ...) -> None: ...

class ChainUpstream(_message.Message):
    __slots__ = ("upstream", "upstream_kind", "upstream_model", "regional")
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_KIND_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    REGIONAL_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    upstream_kind: str
    upstream_model: str
    regional: bool
    def __init__(self, upstream: _Optional[str] = ..., upstream_kind: _Optional[str] = ..., upstream_model: _Optional[str] = ..., regional: _Optional[bool] = ...) -> None: ...

class ModelPatterns(_message.Message):
    __slots__ = ("patterns",)
    PATTERNS_FIELD_NUMBER: _ClassVar[int]
    patterns: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, patterns: _Optional[_Iterable[str]] = ...) -> None: ...
