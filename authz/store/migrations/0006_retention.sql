-- Indexes the retention pruner (authz.ops.retention) deletes by, so that every batch finds its
-- rows without scanning the table. usage_events (started_at), audit_events (at) and the sign-in
-- tables' expires_at are indexed already.
CREATE INDEX sessions_expires_at_idx ON sessions (expires_at);
CREATE INDEX service_tokens_expires_at_idx ON service_tokens (expires_at);
