-- sqlferry metadata, migration 3: the versions index of an S3 store (`serve --store
-- s3://… --meta postgres://…`). One row per version object `replicas/<replica>/v/<number>`
-- of the store at `store` (its s3://BUCKET/PREFIX): what `versions`, `select` (@N,
-- @latest-N, @TIME) and retention read instead of GETting every version object. The
-- object is the truth: a row is inserted only after its object was created, and the rows
-- of a replica are numbered 1..T without gaps (docs/scale-out.md, "The versions index").
CREATE TABLE sqlferry_versions(
    store TEXT NOT NULL,
    replica TEXT NOT NULL,
    number BIGINT NOT NULL CHECK (number > 0),
    page_size INTEGER NOT NULL,
    page_count BIGINT NOT NULL,
    -- Digest 1 (hex; empty when the push ran by chunks and kept some) and the chunked
    -- digest (`c:` and hex).
    digest TEXT NOT NULL,
    digest2 TEXT NOT NULL,
    message TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    client_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    base BIGINT NOT NULL,
    -- When retention removed it (Unix seconds): marked before the tombstone is written
    -- over its object, and kept so that a time it was current is still refused.
    removed_at BIGINT,
    PRIMARY KEY (store, replica, number)
);
