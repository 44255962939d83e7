-- A stable, non-secret id per key (key_ + 16 hex), random and kept across rotation, so a key can be
-- found and revoked without its secret. Existing keys get a random one (gen_random_uuid draws from
-- the server's strong random source; md5 folds its 122 random bits into 16 hex digits).
ALTER TABLE tokens ADD COLUMN key_id TEXT;
UPDATE tokens SET key_id = 'key_' || substr(md5(gen_random_uuid()::text), 1, 16) WHERE key_id IS NULL;
ALTER TABLE tokens ALTER COLUMN key_id SET NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tokens_key_id ON tokens (key_id);
