-- One row per inference request (authz.usagerow.UsageRow). request_id is the primary key so that
-- replaying a spool segment twice, or two workers replaying the same segment, inserts each row once
-- (the ledger writes with ON CONFLICT (request_id) DO NOTHING).
--
-- No CHECK constraints on the free-text columns (outcome, ingress_format, ...): a row the database
-- refuses can only be quarantined, and usage must not be lost over a new enum value.
CREATE TABLE usage_events (
    request_id              text PRIMARY KEY,
    started_at              timestamptz NOT NULL,
    user_sub                text,
    user_email              text,
    groups                  text[] NOT NULL DEFAULT '{}',
    session_id              text,
    cc_session_id           text,
    agent_id                text,
    parent_agent_id         text,
    user_agent              text,
    ingress_format          text NOT NULL,
    operation               text NOT NULL,
    upstream                text,
    requested_model         text,
    upstream_model          text,
    status                  integer NOT NULL,
    outcome                 text NOT NULL,
    reason                  text,
    input_tokens            bigint NOT NULL DEFAULT 0,
    output_tokens           bigint NOT NULL DEFAULT 0,
    output_tokens_estimated boolean NOT NULL DEFAULT false,
    cache_write_tokens      bigint NOT NULL DEFAULT 0,
    cache_write_5m_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_1h_tokens   bigint NOT NULL DEFAULT 0,
    cache_read_tokens       bigint NOT NULL DEFAULT 0,
    cost_usd                numeric(18, 8) NOT NULL DEFAULT 0,
    latency_ms              double precision,
    ttfb_ms                 double precision,
    -- When the row reached the database: later than started_at by the spool delay after an outage.
    recorded_at             timestamptz NOT NULL DEFAULT now()
);

-- Time-range reports and `authz usage` (newest first).
CREATE INDEX usage_events_started_at_idx ON usage_events (started_at);
-- Per-user spend over a period.
CREATE INDEX usage_events_user_email_idx ON usage_events (user_email, started_at);
-- One Claude Code session's requests, in order.
CREATE INDEX usage_events_cc_session_id_idx ON usage_events (cc_session_id, started_at)
    WHERE cc_session_id IS NOT NULL;
