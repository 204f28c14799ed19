-- trainq schema, version 1: jobs, their metric series, and a latest-value summary per metric.
--
-- Postgres is the source of truth for every job's state (Redis only carries job ids). A worker
-- owns a running job through (attempt, lease_expires_at); every write it makes names its attempt.

CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    name             text        NOT NULL,
    -- The experiment kind (`proto::spec::Experiment::kind`), for example 'mnist_classifier'.
    kind             text        NOT NULL,
    -- The JobSpec in the proto3 JSON mapping, exactly as submitted.
    spec             jsonb       NOT NULL,
    -- A copy of spec.labels, so label filters can use the GIN index.
    labels           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    state            text        NOT NULL
        CHECK (state IN ('waiting', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Claims so far; the current attempt while running.
    attempt          integer     NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer     NOT NULL CHECK (max_attempts >= 1),
    -- The worker that holds (or last held) the job.
    worker_id        text,
    lease_expires_at timestamptz,
    -- Retry backoff: the job may not be claimed or dispatched before this instant.
    not_before       timestamptz,
    -- When the id was last pushed to Redis; NULL means "push it at the next reconcile".
    dispatched_at    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- Why the job failed, was retried or was cancelled.
    error            text,
    -- A running job always has an owner and a lease.
    CONSTRAINT running_jobs_hold_a_lease
        CHECK (state <> 'running' OR (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL))
);

-- ListJobs: newest first, keyset pagination on (created_at, id), optionally by state.
CREATE INDEX jobs_created_idx       ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_state_created_idx ON jobs (state, created_at DESC, id DESC);
-- ListJobs label filter (labels @> '{"k":"v"}').
CREATE INDEX jobs_labels_idx        ON jobs USING gin (labels jsonb_path_ops);
-- The reconciler's and the lease reaper's scans.
CREATE INDEX jobs_queued_dispatch_idx ON jobs (dispatched_at) WHERE state = 'queued';
CREATE INDEX jobs_running_lease_idx   ON jobs (lease_expires_at) WHERE state = 'running';

-- Metric series. Exactly-once by key: a point is (job, name, step); a repeated point is skipped.
CREATE TABLE metric_points (
    -- Insertion order across all jobs; WatchJob's cursor.
    seq         bigint           GENERATED ALWAYS AS IDENTITY,
    job_id      uuid             NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name        text             NOT NULL,
    step        bigint           NOT NULL CHECK (step >= 0),
    epoch       integer          NOT NULL CHECK (epoch >= 0),
    value       double precision NOT NULL,
    recorded_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, name, step)
);

-- WatchJob: "points of this job stored after seq N".
CREATE INDEX metric_points_job_seq_idx ON metric_points (job_id, seq);

-- The latest (highest-step) value of every metric of every job, maintained in the same
-- transaction as the points, so GetJob never scans metric_points.
CREATE TABLE job_metric_latest (
    job_id uuid             NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name   text             NOT NULL,
    step   bigint           NOT NULL,
    epoch  integer          NOT NULL,
    value  double precision NOT NULL,
    PRIMARY KEY (job_id, name)
);
