-- How many upstream requests Envoy made for each request: 0 when none was (a refusal, an answer the
-- gateway gave itself), more than 1 when a policy's first upstreams failed before answering and the
-- request failed over to the next (`upstream` then names the one that answered, or failed last).
-- NULL when unknown: rows written before this column, or a failover request cut off before any
-- answer whose count Envoy's access log did not report.
ALTER TABLE usage_events ADD COLUMN attempts integer;
