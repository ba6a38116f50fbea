-- sqlferry metadata, migration 1: what server.db holds (keys, replicas, the server's
-- id) and the log of versions announced to other servers (sqlferry_events), read back
-- by a server whose LISTEN connection was lost (the catch-up).
CREATE TABLE sqlferry_keys(
    id TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('admin', 'push', 'pull')),
    replica TEXT,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at BIGINT,
    -- The order keys were stored in (server.db's rowid): lists are oldest first.
    seq BIGSERIAL NOT NULL
);
-- One admin key, whatever number of servers start at once.
CREATE UNIQUE INDEX sqlferry_keys_one_admin ON sqlferry_keys(kind) WHERE kind = 'admin';
CREATE INDEX sqlferry_keys_replica ON sqlferry_keys(replica);
CREATE TABLE sqlferry_replicas(
    path TEXT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE sqlferry_server(
    one INTEGER PRIMARY KEY CHECK (one = 1),
    id TEXT NOT NULL
);
CREATE TABLE sqlferry_events(
    id BIGSERIAL PRIMARY KEY,
    replica TEXT NOT NULL,
    version BIGINT NOT NULL,
    digest TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    origin TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX sqlferry_events_at ON sqlferry_events(at);
