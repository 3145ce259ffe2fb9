-- Access tokens for service identities (authz service-tokens; authz.signin.service_tokens).
--
-- A service token is a gateway-signed JWT whose jti is this row's id and whose sid is 'svc:' || id
-- (authz.serviceid). Only its SHA-256 is stored: the row identifies a token, it cannot be used as
-- one. Revoked rows are kept until they expire so every replica's revocation set can be rebuilt
-- from this table (and sessions) alone.
CREATE TABLE service_tokens (
    id             text PRIMARY KEY,
    name           text NOT NULL,
    token_hash     bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    groups         text[] NOT NULL DEFAULT '{}',
    -- Model patterns the token is limited to on top of the policy; NULL: the policy alone decides.
    models         text[],
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz NOT NULL,
    created_by     text,
    revoked_at     timestamptz,
    revoked_reason text,
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL)),
    CHECK (expires_at > created_at)
);

CREATE INDEX service_tokens_name_idx ON service_tokens (name, created_at);
-- The full resync of the revocation set reads only revoked, unexpired rows.
CREATE INDEX service_tokens_revoked_idx ON service_tokens (expires_at) WHERE revoked_at IS NOT NULL;

-- Which service identity made a request (NULL for people). Nullable without a default: adding it
-- rewrites nothing and takes only a brief lock. No index: building one would block the ledger's
-- inserts for as long as it takes to read the whole table.
ALTER TABLE usage_events ADD COLUMN service_identity text;
