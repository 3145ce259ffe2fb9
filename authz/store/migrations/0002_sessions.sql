-- Gateway sessions and the sign-in state behind them (DESIGN.md, Sessions; issue 3).
--
-- Every timestamp is written from a clock the application passes in (authz.store.sessions), so the
-- replicas and the tests agree on "now"; only audit_events.at falls back to the server's clock.
-- Secrets are never stored in clear: refresh tokens and device codes by their SHA-256, the IdP's
-- refresh token sealed with authz.secretbox.

-- One row per sign-in. Revoked rows are kept until they expire so that every replica's revocation
-- set can be rebuilt from this table alone (authz.revocation).
CREATE TABLE sessions (
    id                text PRIMARY KEY,
    sub               text NOT NULL,
    email             text NOT NULL,
    -- Groups at sign-in, replaced at every refresh (the IdP is asked again then).
    groups            text[] NOT NULL DEFAULT '{}',
    -- The IdP's session id, the key of OIDC Back-Channel Logout 1.0 (section 2.4, "sid").
    idp_sid           text,
    idp_refresh_token bytea,
    surface           text,
    user_agent        text,
    created_at        timestamptz NOT NULL,
    last_refresh_at   timestamptz NOT NULL,
    -- Absolute lifetime: refreshing never moves it.
    expires_at        timestamptz NOT NULL,
    revoked_at        timestamptz,
    revoked_reason    text,
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);

-- `authz sessions list|revoke --user EMAIL` matches e-mail addresses case-insensitively.
CREATE INDEX sessions_email_idx ON sessions (lower(email));
CREATE INDEX sessions_idp_sid_idx ON sessions (idp_sid) WHERE idp_sid IS NOT NULL;
CREATE INDEX sessions_sub_idx ON sessions (sub);
-- The full resync of the revocation set reads only revoked, unexpired rows.
CREATE INDEX sessions_revoked_idx ON sessions (expires_at) WHERE revoked_at IS NOT NULL;

-- Opaque refresh tokens (at least 256 random bits), by SHA-256 only. A used token is kept, marked,
-- so that presenting it again is recognised as reuse and revokes the session.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL,
    used_at    timestamptz
);

CREATE INDEX refresh_tokens_session_id_idx ON refresh_tokens (session_id);

-- RFC 8628 device authorizations. The page and the polling may hit different replicas, so all of
-- the state lives here.
CREATE TABLE device_codes (
    device_code_hash bytea PRIMARY KEY CHECK (octet_length(device_code_hash) = 32),
    -- Normalised (upper case, no dash): WDJBMJHT.
    user_code        text NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    -- Seconds; grows by 5 at every slow_down (RFC 8628 section 3.5).
    poll_interval    integer NOT NULL CHECK (poll_interval > 0),
    last_poll_at     timestamptz,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'approved', 'denied', 'consumed')),
    session_id       text REFERENCES sessions (id) ON DELETE SET NULL,
    surface          text,
    user_agent       text,
    client_ip        text,
    email            text
);

CREATE INDEX device_codes_expires_at_idx ON device_codes (expires_at);

-- One row per browser redirect to the IdP (authorization code flow with PKCE). The state is bound
-- to the browser by the hash of a random cookie value. After the callback, the verified identity
-- waits here under approval_id until the user approves (or denies) the device on the page.
CREATE TABLE auth_requests (
    state               text PRIMARY KEY,
    browser_hash        bytea NOT NULL,
    user_code           text NOT NULL,
    nonce               text NOT NULL,
    code_verifier       text NOT NULL,
    created_at          timestamptz NOT NULL,
    expires_at          timestamptz NOT NULL,
    used_at             timestamptz,
    approval_id         text UNIQUE,
    -- {"sub", "email", "groups", "idp_sid", "idp_refresh_token_enc" (base64url, sealed)}
    identity            jsonb,
    approval_expires_at timestamptz,
    approval_used_at    timestamptz
);

CREATE INDEX auth_requests_expires_at_idx ON auth_requests (expires_at);

-- What happened at sign-in, refresh and revocation, and why. Free-text columns carry no CHECK: an
-- audit row must never be refused over a new kind or reason.
CREATE TABLE audit_events (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    kind       text NOT NULL,
    outcome    text NOT NULL,
    reason     text,
    email      text,
    session_id text,
    client_ip  text,
    user_agent text,
    detail     jsonb
);

CREATE INDEX audit_events_at_idx ON audit_events (at);
CREATE INDEX audit_events_kind_idx ON audit_events (kind, id);

-- Back-channel logout tokens already acted on, for replay detection (OIDC Back-Channel Logout 1.0,
-- section 2.6, Logout Token Validation). A jti is unique per issuer, hence the pair as the key.
-- Rows are pruned once the token could no longer pass its own exp check.
CREATE TABLE logout_jtis (
    jti        text NOT NULL,
    issuer     text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (issuer, jti)
);

CREATE INDEX logout_jtis_expires_at_idx ON logout_jtis (expires_at);
