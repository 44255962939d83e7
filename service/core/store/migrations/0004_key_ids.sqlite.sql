-- A stable, non-secret id per key (key_ + 16 hex), random and kept across rotation, so a key can be
-- found and revoked without its secret. Existing keys get a random one.
ALTER TABLE tokens ADD COLUMN key_id TEXT;
UPDATE tokens SET key_id = 'key_' || lower(hex(randomblob(8))) WHERE key_id IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tokens_key_id ON tokens (key_id);
