-- Which part of the gateway wrote each row: ext_authz (a refusal), ext_proc (the exchange saw the
-- request end), ext_proc_cut (the exchange's stream closed early) or access_log (Envoy's access-log
-- service reported a request no row had been written for). Rows written when the request's end
-- was seen are final; the two partial kinds merge (authz.store.usagerow.merge_rows).
ALTER TABLE usage_events ADD COLUMN recorded_by text NOT NULL DEFAULT 'ext_proc';
