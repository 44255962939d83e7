-- Limits per team and per key (NULL: no such limit). A team's row exists once anything is set for it;
-- its keys say which teams exist. Budgets are whole micro-dollars per calendar UTC period (day, week,
-- month) or in total.
CREATE TABLE IF NOT EXISTS teams (team_id TEXT PRIMARY KEY, updated_at TEXT NOT NULL);
ALTER TABLE teams ADD COLUMN limit_rpm BIGINT;
ALTER TABLE teams ADD COLUMN limit_tpm BIGINT;
ALTER TABLE teams ADD COLUMN limit_concurrent BIGINT;
ALTER TABLE teams ADD COLUMN budget_micro_usd BIGINT;
ALTER TABLE teams ADD COLUMN budget_period TEXT;
ALTER TABLE tokens ADD COLUMN limit_rpm BIGINT;
ALTER TABLE tokens ADD COLUMN limit_tpm BIGINT;
ALTER TABLE tokens ADD COLUMN limit_concurrent BIGINT;
ALTER TABLE tokens ADD COLUMN budget_micro_usd BIGINT;
ALTER TABLE tokens ADD COLUMN budget_period TEXT
