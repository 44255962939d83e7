-- Team keys, by the SHA-256 digest of the key; the key itself is never stored.
CREATE TABLE IF NOT EXISTS tokens (
    digest     TEXT PRIMARY KEY,
    team_id    TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_team_id ON tokens (team_id);
