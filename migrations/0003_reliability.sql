-- trainq schema, version 3: failures counted apart from claims, resumable training state, and a
-- record of every attempt.

-- Attempts that count against max_attempts: a retryable FailJob and a lease that expired. A
-- hand-back (ReleaseJob, a worker shutting down) does not count, which is why `attempt` (claims)
-- can no longer decide when a job has run out of attempts.
ALTER TABLE jobs ADD COLUMN failed_attempts integer NOT NULL DEFAULT 0
    CHECK (failed_attempts >= 0);
-- Optimiser steps the job trained in all, as its worker reported with CompleteJob; NULL until it
-- succeeded.
ALTER TABLE jobs ADD COLUMN final_step bigint CHECK (final_step >= 0);

-- Before this version every attempt but a running or successful one had failed (there were no
-- hand-backs), so the claims so far are the failures so far.
UPDATE jobs SET failed_attempts = CASE
    WHEN state IN ('running', 'succeeded', 'cancelled') THEN greatest(attempt - 1, 0)
    ELSE attempt
END;

-- The global optimiser step an artifact belongs to (0: not tied to a step). A `resume` artifact
-- (training state a retried attempt resumes from) always names its step (>= 1): a claim hands
-- out the one with the highest step, and only the newest few are kept.
ALTER TABLE artifacts ADD COLUMN step bigint NOT NULL DEFAULT 0 CHECK (step >= 0);

-- "The newest `resume` artifact of this job by step" (ClaimJob) and "all but the newest two"
-- (pruning after each upload).
CREATE INDEX artifacts_job_kind_step_idx ON artifacts (job_id, kind, step DESC, created_at DESC);

-- One row per claim of a job: who ran it, from which training state, and how it ended. Written in
-- the transaction that claims the job, and ended in the transaction that ends the attempt
-- (completion, failure, lease expiry, hand-back, cancellation), so it never disagrees with `jobs`.
CREATE TABLE job_attempts (
    job_id            uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- jobs.attempt as the claim set it (1-based).
    attempt           integer     NOT NULL CHECK (attempt >= 1),
    -- The worker that claimed it.
    worker_id         text        NOT NULL,
    claimed_at        timestamptz NOT NULL DEFAULT now(),
    -- NULL while the attempt runs.
    ended_at          timestamptz,
    -- 'running' until the attempt ends; only 'failed' and 'lease_expired' count against
    -- max_attempts.
    outcome           text        NOT NULL DEFAULT 'running'
        CHECK (outcome IN ('running', 'succeeded', 'failed', 'lease_expired', 'handed_back',
                           'cancelled')),
    -- The step of the `resume` artifact the claim handed out (0: from scratch), so a reader can
    -- tell how much work each retry saved.
    resumed_from_step bigint      NOT NULL DEFAULT 0 CHECK (resumed_from_step >= 0),
    -- Why it ended, when it did not succeed (the worker's reason, or the coordinator's).
    reason            text,
    PRIMARY KEY (job_id, attempt),
    CONSTRAINT ended_attempts_have_an_end
        CHECK ((outcome = 'running') = (ended_at IS NULL))
);

-- Jobs that were running when this version was applied get the record of their current attempt,
-- so that its end is recorded like any other.
INSERT INTO job_attempts (job_id, attempt, worker_id, claimed_at)
SELECT id, attempt, worker_id, coalesce(started_at, now())
FROM jobs
WHERE state = 'running' AND attempt >= 1;
