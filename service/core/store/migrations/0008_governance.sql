-- Key governance: allow-lists per key and per team, key expiry, the previous secret of a key rotated
-- with a grace period, and the audit trail.
-- Team-level settings: a team's allow-lists go beside its limits in the teams table of 0007 (one row
-- per team that has any; a team is otherwise only the keys naming it). Lists are JSON arrays of strings
-- as text; NULL: no list.
CREATE TABLE IF NOT EXISTS teams (team_id TEXT PRIMARY KEY, updated_at TEXT NOT NULL);
ALTER TABLE teams ADD COLUMN allowed_models TEXT;
ALTER TABLE teams ADD COLUMN allowed_providers TEXT;
ALTER TABLE tokens ADD COLUMN allowed_models TEXT;
ALTER TABLE tokens ADD COLUMN allowed_providers TEXT;
-- When the key stops working (ISO UTC text, like every time here); NULL: never.
ALTER TABLE tokens ADD COLUMN expires_at TEXT;
-- Set once the key's expiry has been recorded in the audit trail (exactly once, whichever process sees it).
ALTER TABLE tokens ADD COLUMN expiry_recorded BOOLEAN NOT NULL DEFAULT FALSE;
-- A key rotated with a grace period: the old secret's digest, accepted until previous_until.
ALTER TABLE tokens ADD COLUMN previous_digest TEXT;
ALTER TABLE tokens ADD COLUMN previous_until TEXT;
CREATE INDEX IF NOT EXISTS tokens_previous_digest ON tokens (previous_digest);
CREATE INDEX IF NOT EXISTS tokens_expires_at ON tokens (expires_at);
-- Who changed what, when: never pruned (the usage retention only deletes usage_ledger rows). changes
-- is a JSON object of field → {"before", "after"}; no secret is ever written here.
CREATE TABLE IF NOT EXISTS audit_log (
    id             TEXT PRIMARY KEY,
    at             TEXT NOT NULL,
    action         TEXT NOT NULL,
    actor          TEXT NOT NULL,
    team_id        TEXT,
    key_id         TEXT,
    changes        TEXT NOT NULL,
    client_address TEXT,
    request_id     TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at, id);
CREATE INDEX IF NOT EXISTS audit_log_team_at ON audit_log (team_id, at);
CREATE INDEX IF NOT EXISTS audit_log_key_at ON audit_log (key_id, at);
