-- For listing keys without ever storing them: the key's first 8 characters, and when it was last used.
ALTER TABLE tokens ADD COLUMN key_prefix TEXT NOT NULL DEFAULT '';
ALTER TABLE tokens ADD COLUMN last_used_at TEXT;
CREATE INDEX IF NOT EXISTS tokens_created_at ON tokens (created_at, digest);
