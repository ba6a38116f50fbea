-- sqlferry metadata, migration 2: what each server's hub knows of its subscribers, so
-- that the API and dashboard of every server sharing the store show them all. Each
-- server process (its relay's instance id, not the shared server id) rewrites its own
-- rows at most once a second, and its heartbeat (sqlferry_instances.seen_at) at least
-- every few seconds; the rows of a process whose heartbeat is stale are not shown, and
-- are deleted (with it) a minute later by whichever server comes first.
CREATE TABLE sqlferry_instances(
    instance TEXT PRIMARY KEY,
    seen_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- One row per subscriber connected to a server: push or pull, and for a pull
-- subscriber the version its database holds (APPLIED) and since when it lags.
CREATE TABLE sqlferry_positions(
    instance TEXT NOT NULL REFERENCES sqlferry_instances(instance) ON DELETE CASCADE,
    member BIGINT NOT NULL,
    replica TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('push', 'pull')),
    applied_version BIGINT,
    applied_at BIGINT,
    behind_since BIGINT,
    PRIMARY KEY (instance, member)
);
CREATE INDEX sqlferry_positions_replica ON sqlferry_positions(replica);
-- The push a push subscriber announced (CHANGED), until a push of the replica commits.
CREATE TABLE sqlferry_expected(
    instance TEXT NOT NULL REFERENCES sqlferry_instances(instance) ON DELETE CASCADE,
    replica TEXT NOT NULL,
    expected_push_at BIGINT NOT NULL,
    PRIMARY KEY (instance, replica)
);
-- A push subscriber's latest failure report (REPORT), until a push of the replica
-- commits.
CREATE TABLE sqlferry_failures(
    instance TEXT NOT NULL REFERENCES sqlferry_instances(instance) ON DELETE CASCADE,
    replica TEXT NOT NULL,
    failing_since BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    error TEXT NOT NULL,
    reported_at BIGINT NOT NULL,
    PRIMARY KEY (instance, replica)
);
