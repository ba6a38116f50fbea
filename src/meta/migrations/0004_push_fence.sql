-- sqlferry metadata, migration 4: the fence between the sweep of an S3 store and the
-- pushes of every server sharing this database (docs/scale-out.md, "The fence"). A push
-- inserts its record here once it holds the fence's advisory lock (shared), before it
-- checks (HEAD) what its version will name, and deletes it in the statement that inserts
-- its version's row (or when it fails). The sweep holds the lock exclusively while it
-- deletes: a record it finds then is a push whose session ended mid-commit (its server
-- killed, its connection lost), whose version object may exist without a row; the sweep
-- reads that object and keeps what it names.
CREATE TABLE sqlferry_pushing(
    id BIGSERIAL PRIMARY KEY,
    store TEXT NOT NULL,
    replica TEXT NOT NULL,
    number BIGINT NOT NULL CHECK (number > 0),
    -- When the push took the fence (Unix seconds, PostgreSQL's clock).
    started_at BIGINT NOT NULL
);
CREATE INDEX sqlferry_pushing_store ON sqlferry_pushing(store);
