-- The SQLite ledger drops its time index: request ids now start with the request's time (12 hex
-- digits of milliseconds, 32 characters in all), so a time range is a range of the primary key, and
-- each proxied request costs one B-tree insertion fewer. Rows with ids of another shape (all the
-- rows written before this migration) keep a partial time index, which new rows never enter.
DROP INDEX IF EXISTS usage_ledger_at;
CREATE INDEX IF NOT EXISTS usage_ledger_at_other_ids ON usage_ledger (at) WHERE length(request_id) <> 32;
