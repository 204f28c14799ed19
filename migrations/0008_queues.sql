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

-- Resources (spec.resources), read out of the stored spec the same way, for the claim: which
-- device kind the job needs (`any`, `cuda`, `cpu`) and how much GPU memory on a CUDA worker, in
-- MiB: the request, or the default estimate of proto::spec::default_gpu_memory_mib (256 MiB plus
-- 1 MiB per image of the batch; a store test pins the two together).
ALTER TABLE jobs
    ADD COLUMN needs_device text NOT NULL
        GENERATED ALWAYS AS (CASE spec -> 'resources' ->> 'device'
                                 WHEN 'DEVICE_KIND_CUDA' THEN 'cuda'
                                 WHEN 'DEVICE_KIND_CPU' THEN 'cpu'
                                 ELSE 'any' END) STORED,
    ADD COLUMN needs_gpu_mib integer NOT NULL
        GENERATED ALWAYS AS (coalesce(nullif((spec -> 'resources' ->> 'gpuMemoryMib')::integer, 0),
                                      256 + coalesce((spec -> 'training' ->> 'batchSize')::integer, 0)))
        STORED;

COMMENT ON COLUMN jobs.needs_device IS 'Device kind the job needs: any, cuda or cpu (spec.resources.device).';
COMMENT ON COLUMN jobs.needs_gpu_mib IS 'GPU memory the job needs on a CUDA worker, MiB (spec.resources.gpu_memory_mib, or 256 + batch size).';
