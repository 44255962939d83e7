-- A counter every write bumps: processes poll it to drop cached keys (the fallback to LISTEN/NOTIFY).
CREATE TABLE IF NOT EXISTS gateway_state (
    id      INTEGER PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO gateway_state (id, version) VALUES (1, 0);
