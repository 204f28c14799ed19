-- trainq schema, version 2: job dependencies and the artifacts jobs store.

-- A job waits (state 'waiting') until every job it depends on has succeeded; if one fails or is
-- cancelled it fails with `dependency_failed`. Rows are written once, at submit, in the same
-- transaction as the job, and only ever name jobs that already existed then: so the graph has no
-- cycle (the store checks that as well).
CREATE TABLE job_dependencies (
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    depends_on uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, depends_on),
    CONSTRAINT a_job_does_not_depend_on_itself CHECK (job_id <> depends_on)
);

-- "Which jobs wait for this one?", asked whenever a job finishes.
CREATE INDEX job_dependencies_depends_on_idx ON job_dependencies (depends_on);

-- Files a job stored (checkpoints, image grids). The bytes live in the coordinator's artifact
-- store (TRAINQ_ARTIFACTS: file:// or s3://) under `jobs/<job_id>/<attempt>/<kind>/<name>`; this
-- row is written only after the bytes were stored and checked against size and SHA-256.
CREATE TABLE artifacts (
    id         uuid        PRIMARY KEY,
    job_id     uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- The attempt that stored it (its lease was current when the row was written).
    attempt    integer     NOT NULL CHECK (attempt >= 1),
    -- `checkpoint`, `samples`, `reconstructions`, ...: 1..=32 of [a-z0-9_-].
    kind       text        NOT NULL CHECK (kind ~ '^[a-z0-9_-]{1,32}$'),
    -- File name: 1..=128 of [A-Za-z0-9._-].
    name       text        NOT NULL CHECK (name ~ '^[A-Za-z0-9._-]{1,128}$'),
    -- 1-based epoch it belongs to; 0 when not tied to an epoch.
    epoch      integer     NOT NULL CHECK (epoch >= 0),
    size_bytes bigint      NOT NULL CHECK (size_bytes >= 0),
    -- Lowercase hex SHA-256 of the content.
    sha256     text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    -- Where the store keeps it (file:///... or s3://bucket/...).
    uri        text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- One object per key: an attempt that stores the same kind and name again replaces it.
    CONSTRAINT artifacts_one_per_key UNIQUE (job_id, attempt, kind, name)
);

-- ListArtifacts (oldest first, optionally one kind) and "the newest artifact of this kind".
CREATE INDEX artifacts_job_kind_created_idx ON artifacts (job_id, kind, created_at);
