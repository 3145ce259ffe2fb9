-- Spend caps and rate limits (authz.store.spend; docs/architecture.md, "Money and limits").

-- Caps set at run time with `authz spend-limits`. scope: user (name: the e-mail, lower-cased, or a
-- service identity's subject), group (each member of the group on their own), group_pool (the
-- members' spend together), org (name '*': everyone's spend together). Changes are audited in
-- audit_events (spend_limit_set, spend_limit_delete) with the old and new amounts.
CREATE TABLE spend_limits (
    scope      text NOT NULL CHECK (scope IN ('user', 'group', 'group_pool', 'org')),
    name       text NOT NULL,
    period     text NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly')),
    usd        numeric(18, 8) NOT NULL CHECK (usd >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text,
    PRIMARY KEY (scope, name, period)
);

-- Settled spend per scope (user, group_pool, org), name and period (its UTC start). The ledger adds
-- each usage row's cost in the transaction that inserts the row, so a counter is always the sum of
-- its rows' costs.
CREATE TABLE spend_counters (
    scope        text NOT NULL,
    name         text NOT NULL,
    period       text NOT NULL,
    period_start timestamptz NOT NULL,
    spent        numeric(18, 8) NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, name, period, period_start)
);

CREATE INDEX spend_counters_period_start_idx ON spend_counters (period_start);

-- Groups whose members' spend is counted together (they have, or had, a shared budget), and since
-- when (authz.store.spend.track_group fills their counters for the current periods on the way in).
CREATE TABLE spend_groups (
    name  text PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now()
);

-- Budget a worker holds to admit requests without asking PostgreSQL: its unused slice plus the
-- estimates of the requests it admitted whose rows are not written yet. Counted while unexpired;
-- the holder renews it, so a dead worker's budget comes back after spend.lease_ttl.
CREATE TABLE spend_leases (
    id           text PRIMARY KEY,
    holder       text NOT NULL,
    scope        text NOT NULL,
    name         text NOT NULL,
    period       text NOT NULL,
    period_start timestamptz NOT NULL,
    amount       numeric(18, 8) NOT NULL,
    expires_at   timestamptz NOT NULL
);

CREATE INDEX spend_leases_bucket_idx ON spend_leases (scope, name, period, period_start);
CREATE INDEX spend_leases_holder_idx ON spend_leases (holder);
CREATE INDEX spend_leases_expires_at_idx ON spend_leases (expires_at);

-- Requests admitted (pushed by each worker) and tokens used (added with the rows) per user and
-- minute, for policies[].rate_limits. Rows older than a few minutes are pruned.
CREATE TABLE rate_counters (
    user_key text NOT NULL,
    minute   timestamptz NOT NULL,
    requests integer NOT NULL DEFAULT 0,
    tokens   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_key, minute)
);

CREATE INDEX rate_counters_minute_idx ON rate_counters (minute);

-- What admission reserved for a request, and the leases it reserved on (settled when the row is
-- written). A constant default: adding the columns rewrites nothing.
ALTER TABLE usage_events ADD COLUMN reserved_usd numeric(18, 8) NOT NULL DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN leases text[] NOT NULL DEFAULT '{}';

-- The rows already written count too: every user's and the organisation's spend in the current
-- periods (a week may have started in the previous month).
INSERT INTO spend_counters (scope, name, period, period_start, spent)
SELECT k.scope, k.name, p.period,
       date_trunc(p.unit, u.started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS period_start,
       sum(u.cost_usd)
FROM usage_events AS u
CROSS JOIN LATERAL (
    VALUES ('user', COALESCE(NULLIF(lower(u.user_email), ''), u.user_sub)), ('org', '*')
) AS k(scope, name)
CROSS JOIN (VALUES ('daily', 'day'), ('weekly', 'week'), ('monthly', 'month')) AS p(period, unit)
WHERE u.cost_usd <> 0
  AND k.name IS NOT NULL
  AND u.started_at >= (date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC') - interval '7 days'
GROUP BY 1, 2, 3, 4;
