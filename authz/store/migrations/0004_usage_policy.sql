-- The policy that admitted (or refused) each request, and whether the input count is an estimate
-- from the request body size (a request that reached the upstream but whose usage never came back).
ALTER TABLE usage_events ADD COLUMN policy text;
ALTER TABLE usage_events ADD COLUMN input_tokens_estimated boolean NOT NULL DEFAULT false;
