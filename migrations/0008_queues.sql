-- Queues and priorities: each job waits on one queue (spec.queue, `default` when the spec names
-- none) with a priority (spec.priority, 0 by default; higher runs first). Both are read out of
-- the stored spec, so every way a job is inserted (SubmitJob, a sweep's multi-row inserts) sets
-- them, and they can never disagree with it. The coordinator checked both at submit (1..=32
-- characters of [a-z0-9-]; -1000..=1000).
ALTER TABLE jobs
    ADD COLUMN queue text NOT NULL
        GENERATED ALWAYS AS (coalesce(nullif(spec ->> 'queue', ''), 'default')) STORED,
    ADD COLUMN priority integer NOT NULL
        GENERATED ALWAYS AS (coalesce((spec ->> 'priority')::integer, 0)) STORED;

COMMENT ON COLUMN jobs.queue IS 'The queue the job waits on (spec.queue; default when unset).';
COMMENT ON COLUMN jobs.priority IS 'Higher runs first (spec.priority; 0 when unset).';

-- Per-queue depth, the oldest queued job and the reconciler's order: queued jobs by queue,
-- highest priority first, then oldest.
CREATE INDEX jobs_queued_by_queue_idx ON jobs (queue, priority DESC, created_at)
    WHERE state = 'queued';
