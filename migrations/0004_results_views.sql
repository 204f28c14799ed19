-- trainq schema, version 4: read-only views for people who query results in SQL.
--
-- The views read the stored spec (`jobs.spec`, the JobSpec in the proto3 JSON mapping: camelCase
-- field names, 64-bit integers as strings, enums by name, fields at their default left out) and
-- apply the proto's documented defaults, so a reader never has to know that mapping. They add no
-- state: every column is computed from the tables at query time. Views only: nothing writes
-- through them, and the coordinator never reads them.
--
--   job_summary      one row per job: kind, hyper-parameters, initialisation, state, attempts,
--                    timing and final metrics (from job_metric_latest, never metric_points)
--   metric_series    every metric point with its job's name and kind
--   artifact_files   every stored artifact with its job's name and kind (`artifacts` is the
--                    table, so the view has another name)

-- Reading one metric across many jobs (a learning curve per initialisation, the best epoch of
-- every CVAE) would otherwise scan every point of every job: the primary key (job_id, name, step)
-- serves only one job at a time. Covering, so those reads never touch the table. Measured with
-- trainq-views-bench (1,000,000 points): about 75 MB, and bulk inserts of points take about 1.6x
-- as long; a worker's batches are small, so its reports barely notice.
CREATE INDEX metric_points_name_job_step_idx
    ON metric_points (name, job_id, step) INCLUDE (epoch, value);

CREATE VIEW job_summary AS
SELECT
    j.id,
    j.name,
    j.kind,
    j.labels,
    -- Hyper-parameters (proto `Training`), with the proto's defaults applied.
    (j.spec->'training'->>'epochs')::integer AS epochs,
    (j.spec->'training'->>'batchSize')::integer AS batch_size,
    (j.spec->'training'->>'learningRate')::double precision AS learning_rate,
    CASE coalesce(j.spec->'training'->>'optimizer', 'OPTIMIZER_UNSPECIFIED')
        WHEN 'OPTIMIZER_UNSPECIFIED' THEN 'adam'
        ELSE lower(replace(j.spec->'training'->>'optimizer', 'OPTIMIZER_', ''))
    END AS optimizer,
    coalesce((j.spec->'training'->>'seed')::numeric, 0) AS seed,
    nullif(coalesce((j.spec->'training'->>'maxTrainExamples')::integer, 0), 0) AS max_train_examples,
    nullif(coalesce((j.spec->'training'->>'maxTestExamples')::integer, 0), 0) AS max_test_examples,
    -- CVAE options (proto `CifarCvae`); NULL for other kinds.
    CASE WHEN j.spec ? 'cifarCvae' THEN
        coalesce(nullif((j.spec->'cifarCvae'->>'latentDim')::integer, 0), 20)
    END AS latent_dim,
    CASE WHEN j.spec ? 'cifarCvae' THEN
        coalesce((j.spec->'cifarCvae'->>'beta')::double precision, 1)
    END AS beta,
    -- Initialisation (proto `Initialization`); NULL for kinds that have none.
    i.init,
    i.init_conv1,
    i.init_copy_conv2,
    i.init_freeze,
    i.init_freeze_value,
    i.init_source_job_id,
    CASE i.init
        WHEN 'random' THEN 'random'
        WHEN 'transfer' THEN concat_ws('/', 'transfer', i.init_conv1,
            CASE WHEN i.init_copy_conv2 THEN 'conv2' END,
            CASE i.init_freeze
                WHEN 'none' THEN NULL
                WHEN 'whole_run' THEN 'frozen'
                ELSE i.init_freeze || '=' || i.init_freeze_value
            END)
    END AS init_arm,
    -- Execution.
    j.state,
    j.attempt AS attempts,
    j.failed_attempts,
    j.max_attempts,
    j.worker_id,
    j.error,
    j.created_at,
    j.started_at,
    j.finished_at,
    extract(epoch FROM j.finished_at - j.started_at)::double precision AS duration_s,
    j.final_step,
    -- Final metrics: the latest (highest-step) value of each.
    m.train_loss,
    m.test_loss,
    m.test_accuracy,
    m.test_neg_elbo_nats,
    m.test_bits_per_dim,
    m.test_recon,
    m.test_kl
FROM jobs j
CROSS JOIN LATERAL (
    SELECT
        CASE
            WHEN NOT j.spec ? 'cifarCvae' THEN NULL
            WHEN t IS NULL THEN 'random'
            ELSE 'transfer'
        END AS init,
        lower(replace(t->>'conv1', 'CONV1_ADAPTATION_', '')) AS init_conv1,
        CASE WHEN t IS NOT NULL THEN coalesce((t->>'copyConv2')::boolean, false) END
            AS init_copy_conv2,
        CASE
            WHEN t IS NULL THEN NULL
            WHEN (t->'freeze'->>'wholeRun')::boolean THEN 'whole_run'
            WHEN t->'freeze' ? 'firstEpochs' THEN 'first_epochs'
            WHEN t->'freeze' ? 'lrMultiplier' THEN 'lr_multiplier'
            ELSE 'none'
        END AS init_freeze,
        coalesce((t->'freeze'->>'firstEpochs')::double precision,
                 (t->'freeze'->>'lrMultiplier')::double precision) AS init_freeze_value,
        (t->>'sourceJobId')::uuid AS init_source_job_id
    FROM (SELECT j.spec->'cifarCvae'->'init'->'transfer' AS t) s
) i
LEFT JOIN LATERAL (
    SELECT
        max(l.value) FILTER (WHERE l.name = 'train/loss') AS train_loss,
        max(l.value) FILTER (WHERE l.name = 'test/loss') AS test_loss,
        max(l.value) FILTER (WHERE l.name = 'test/accuracy') AS test_accuracy,
        max(l.value) FILTER (WHERE l.name = 'test/neg_elbo_nats') AS test_neg_elbo_nats,
        max(l.value) FILTER (WHERE l.name = 'test/bits_per_dim') AS test_bits_per_dim,
        max(l.value) FILTER (WHERE l.name = 'test/recon') AS test_recon,
        max(l.value) FILTER (WHERE l.name = 'test/kl') AS test_kl
    FROM job_metric_latest l
    WHERE l.job_id = j.id
) m ON true;

COMMENT ON VIEW job_summary IS
    'One row per job: kind, hyper-parameters (proto defaults applied), initialisation, state, '
    'attempts, timing and final metrics (latest value by step, from job_metric_latest).';
COMMENT ON COLUMN job_summary.id IS 'The job id (jobs.id).';
COMMENT ON COLUMN job_summary.name IS 'spec.name.';
COMMENT ON COLUMN job_summary.kind IS 'The experiment kind: mnist_classifier or cifar_cvae.';
COMMENT ON COLUMN job_summary.labels IS 'spec.labels as a JSON object; filter with labels @> ''{"k":"v"}''.';
COMMENT ON COLUMN job_summary.epochs IS 'training.epochs.';
COMMENT ON COLUMN job_summary.batch_size IS 'training.batchSize: images per optimiser step.';
COMMENT ON COLUMN job_summary.learning_rate IS 'training.learningRate.';
COMMENT ON COLUMN job_summary.optimizer IS 'adam, sgd or adamw (OPTIMIZER_UNSPECIFIED means adam).';
COMMENT ON COLUMN job_summary.seed IS 'training.seed (uint64, hence numeric); 0 when unset.';
COMMENT ON COLUMN job_summary.max_train_examples IS 'training.maxTrainExamples; NULL means the whole training set.';
COMMENT ON COLUMN job_summary.max_test_examples IS 'training.maxTestExamples; NULL means the whole test set.';
COMMENT ON COLUMN job_summary.latent_dim IS 'CVAE latent dimension (unset means the seed''s 20); NULL for other kinds.';
COMMENT ON COLUMN job_summary.beta IS 'CVAE weight of the KL term (unset means 1); NULL for other kinds.';
COMMENT ON COLUMN job_summary.init IS 'CVAE initialisation: random or transfer; NULL for other kinds.';
COMMENT ON COLUMN job_summary.init_conv1 IS 'Transfer: how conv1 was adapted (replicate_third, luminance, keep_random); NULL for random.';
COMMENT ON COLUMN job_summary.init_copy_conv2 IS 'Transfer: whether conv2 was copied; NULL for random.';
COMMENT ON COLUMN job_summary.init_freeze IS 'Transfer: none, whole_run, first_epochs or lr_multiplier; NULL for random.';
COMMENT ON COLUMN job_summary.init_freeze_value IS 'Transfer: the epochs (first_epochs) or the multiplier (lr_multiplier); else NULL.';
COMMENT ON COLUMN job_summary.init_source_job_id IS 'Transfer: the MNIST-classifier job whose final checkpoint was the source.';
COMMENT ON COLUMN job_summary.init_arm IS
    'The initialisation as one label to group by: random, or transfer/<conv1>[/conv2][/frozen | /first_epochs=N | /lr_multiplier=x].';
COMMENT ON COLUMN job_summary.state IS 'waiting, queued, running, succeeded, failed or cancelled.';
COMMENT ON COLUMN job_summary.attempts IS 'Claims so far (jobs.attempt), hand-backs included.';
COMMENT ON COLUMN job_summary.failed_attempts IS 'Attempts that failed or lost their lease (these count against max_attempts).';
COMMENT ON COLUMN job_summary.max_attempts IS 'spec.maxAttempts with its default applied.';
COMMENT ON COLUMN job_summary.worker_id IS 'The worker that holds, or last held, the job.';
COMMENT ON COLUMN job_summary.error IS 'Why the job failed, was retried or was cancelled.';
COMMENT ON COLUMN job_summary.created_at IS 'When it was submitted.';
COMMENT ON COLUMN job_summary.started_at IS 'When it was first claimed.';
COMMENT ON COLUMN job_summary.finished_at IS 'When it reached a final state.';
COMMENT ON COLUMN job_summary.duration_s IS 'finished_at - started_at in seconds (retries and backoff included); NULL until finished.';
COMMENT ON COLUMN job_summary.final_step IS 'Optimiser steps trained in all, as reported at completion; NULL unless succeeded.';
COMMENT ON COLUMN job_summary.train_loss IS 'Latest train/loss.';
COMMENT ON COLUMN job_summary.test_loss IS 'Latest test/loss (classifier: cross-entropy; CVAE: the loss per image).';
COMMENT ON COLUMN job_summary.test_accuracy IS 'Latest test/accuracy (classifier).';
COMMENT ON COLUMN job_summary.test_neg_elbo_nats IS 'Latest test/neg_elbo_nats: negative ELBO in nats per image (CVAE).';
COMMENT ON COLUMN job_summary.test_bits_per_dim IS 'Latest test/bits_per_dim (CVAE).';
COMMENT ON COLUMN job_summary.test_recon IS 'Latest test/recon: reconstruction term per image (CVAE).';
COMMENT ON COLUMN job_summary.test_kl IS 'Latest test/kl: KL term per image (CVAE).';

CREATE VIEW metric_series AS
SELECT
    p.job_id,
    j.name AS job_name,
    j.kind,
    p.name AS metric,
    p.step,
    p.epoch,
    p.value,
    p.recorded_at
FROM metric_points p
JOIN jobs j ON j.id = p.job_id;

COMMENT ON VIEW metric_series IS
    'Every metric point with its job''s name and kind. Filter by job_id (or job_name) and metric, '
    'order by step: the (job_id, name, step) key serves that without sorting.';
COMMENT ON COLUMN metric_series.job_id IS 'The job (jobs.id).';
COMMENT ON COLUMN metric_series.job_name IS 'The job''s spec.name (not unique).';
COMMENT ON COLUMN metric_series.kind IS 'The job''s experiment kind.';
COMMENT ON COLUMN metric_series.metric IS 'Metric name, for example train/loss or test/neg_elbo_nats.';
COMMENT ON COLUMN metric_series.step IS 'Global optimiser step; epoch metrics sit at the last step of their epoch.';
COMMENT ON COLUMN metric_series.epoch IS '1-based epoch the point belongs to.';
COMMENT ON COLUMN metric_series.value IS 'The value.';
COMMENT ON COLUMN metric_series.recorded_at IS 'When the coordinator stored the point.';

CREATE VIEW artifact_files AS
SELECT
    a.id,
    a.job_id,
    j.name AS job_name,
    j.kind AS job_kind,
    a.attempt,
    a.kind,
    a.name,
    'jobs/' || a.job_id || '/' || a.attempt || '/' || a.kind || '/' || a.name AS key,
    a.epoch,
    a.step,
    a.size_bytes,
    a.sha256,
    a.uri,
    a.created_at
FROM artifacts a
JOIN jobs j ON j.id = a.job_id;

COMMENT ON VIEW artifact_files IS
    'Every stored artifact (checkpoints, resume states, image grids) with its job''s name and '
    'kind. Named artifact_files because artifacts is the table.';
COMMENT ON COLUMN artifact_files.id IS 'The artifact id (what DownloadArtifact takes).';
COMMENT ON COLUMN artifact_files.job_id IS 'The job that stored it.';
COMMENT ON COLUMN artifact_files.job_name IS 'The job''s spec.name.';
COMMENT ON COLUMN artifact_files.job_kind IS 'The job''s experiment kind.';
COMMENT ON COLUMN artifact_files.attempt IS 'The attempt that stored it.';
COMMENT ON COLUMN artifact_files.kind IS 'Artifact kind: checkpoint, resume, samples, reconstructions, ...';
COMMENT ON COLUMN artifact_files.name IS 'File name.';
COMMENT ON COLUMN artifact_files.key IS 'Object key in the artifact store: jobs/<job_id>/<attempt>/<kind>/<name>.';
COMMENT ON COLUMN artifact_files.epoch IS '1-based epoch it belongs to; 0 when not tied to an epoch.';
COMMENT ON COLUMN artifact_files.step IS 'Optimiser step it belongs to; 0 when not tied to a step.';
COMMENT ON COLUMN artifact_files.size_bytes IS 'Size in bytes.';
COMMENT ON COLUMN artifact_files.sha256 IS 'Lowercase hex SHA-256 of the content.';
COMMENT ON COLUMN artifact_files.uri IS 'Where the store keeps it (file:///... or s3://bucket/...).';
COMMENT ON COLUMN artifact_files.created_at IS 'When it was recorded.';
