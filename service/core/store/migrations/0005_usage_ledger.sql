-- The usage ledger: one row per proxied request, by the gateway's own request id. Times are ISO UTC
-- text like the tokens table's (2026-11-30T14:02:11.482Z), so they sort and compare as text.
-- Token counts are NULL when the provider did not report them; cost_micro_usd is NULL when the model
-- has no price (never 0 for that).
CREATE TABLE IF NOT EXISTS usage_ledger (
    request_id         TEXT PRIMARY KEY,
    client_request_id  TEXT,
    at                 TEXT NOT NULL,
    team_id            TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    provider           TEXT NOT NULL,
    model              TEXT,
    status             INTEGER NOT NULL,
    input_tokens       BIGINT,
    output_tokens      BIGINT,
    cache_read_tokens  BIGINT,
    cache_write_tokens BIGINT,
    reasoning_tokens   BIGINT,
    cost_micro_usd     BIGINT,
    duration_ms        DOUBLE PRECISION NOT NULL,
    ttfb_ms            DOUBLE PRECISION,
    complete           BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ledger_at ON usage_ledger (at);
CREATE INDEX IF NOT EXISTS usage_ledger_team_at ON usage_ledger (team_id, at);
CREATE INDEX IF NOT EXISTS usage_ledger_key_at ON usage_ledger (key_id, at);
-- Totals per UTC day, team, key, provider and model, added to in the transaction that inserts the
-- ledger rows: reports over long ranges read these, and they outlive the ledger's retention.
-- model is '' where the ledger's is NULL (a primary key column cannot be NULL); cost_micro_usd sums
-- the priced requests only, unpriced_requests counts the others.
CREATE TABLE IF NOT EXISTS usage_daily (
    day                TEXT NOT NULL,
    team_id            TEXT NOT NULL,
    key_id             TEXT NOT NULL,
    provider           TEXT NOT NULL,
    model              TEXT NOT NULL,
    requests           BIGINT NOT NULL,
    input_tokens       BIGINT NOT NULL,
    output_tokens      BIGINT NOT NULL,
    cache_read_tokens  BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    reasoning_tokens   BIGINT NOT NULL,
    cost_micro_usd     BIGINT NOT NULL,
    unpriced_requests  BIGINT NOT NULL,
    PRIMARY KEY (day, team_id, key_id, provider, model)
);
CREATE INDEX IF NOT EXISTS usage_daily_team_day ON usage_daily (team_id, day);
CREATE INDEX IF NOT EXISTS usage_daily_key_day ON usage_daily (key_id, day);
