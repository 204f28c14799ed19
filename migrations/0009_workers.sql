-- The fleet: each worker process reports itself (WorkerService.WorkerHeartbeat) at start and
-- every heartbeat interval; JobService.ListWorkers and GetWorker read this table. A row is one
-- worker id; a restart with the same id (a new instance_id) starts its started_at anew. Rows are
-- kept: a worker silent for longer than the lease timeout is shown as lost.
CREATE TABLE workers (
    id           text        PRIMARY KEY CHECK (char_length(id) BETWEEN 1 AND 256),
    instance_id  text        NOT NULL,
    host         text        NOT NULL,
    version      text        NOT NULL,
    -- [{"name": "cuda:0", "memory_total_bytes": ..., "memory_used_bytes": ...}, ...]
    devices      jsonb       NOT NULL DEFAULT '[]'::jsonb,
    slots_total  integer     NOT NULL CHECK (slots_total >= 1),
    slots_busy   integer     NOT NULL CHECK (slots_busy >= 0 AND slots_busy <= slots_total),
    -- The queues it serves, in its order.
    queues       text[]      NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE workers IS 'Worker processes as they last reported themselves (WorkerService.WorkerHeartbeat).';
COMMENT ON COLUMN workers.instance_id IS 'Random per process start: a new one restarts started_at.';
COMMENT ON COLUMN workers.devices IS 'Training devices with memory in all and in use, in bytes (0 when unknown).';
COMMENT ON COLUMN workers.queues IS 'The queues the worker serves, in the order it serves them.';
COMMENT ON COLUMN workers.last_seen_at IS 'Its latest report; silent past the lease timeout means lost.';

-- "Which live workers serve queue q": the queues of workers seen lately.
CREATE INDEX workers_last_seen_idx ON workers (last_seen_at DESC);
-- A worker's running jobs.
CREATE INDEX jobs_running_worker_idx ON jobs (worker_id) WHERE state = 'running';
