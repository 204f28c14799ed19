-- trainq schema, version 5: sweeps (studies over a grid of arms and random seeds).
--
-- A sweep is a base JobSpec run at every point of a grid ("arm") with every random seed, plus an
-- optional source stage (one MNIST-classifier job per seed that the transfer arms start from).
-- Its jobs are ordinary rows of `jobs`; these tables only record which job plays which part.
-- A sweep's state is derived from its jobs' states, never stored (Postgres' `jobs.state` stays
-- the one truth), except that CancelSweep records when it was called.
--
--   sweeps          one row per sweep: name, labels, the SweepSpec, the arms' experiment kind
--   sweep_arms      the arms in grid order, and which use random initialisation
--   sweep_runs      every job of every sweep: arm (or 'source'), seed, position
--   student_t_975   Student-t 97.5% quantiles for the summary's confidence intervals
--   sweep_summary   (view) per sweep, arm, default metric and stage: the same statistics as the
--                   GetSweepSummary RPC with its defaults

CREATE TABLE sweeps (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL,
    -- The experiment kind of every arm's runs: 'cifar_cvae' or 'mnist_classifier'. It picks the
    -- summary's default metrics.
    kind         text        NOT NULL,
    -- A copy of spec.labels.
    labels       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- The SweepSpec in the proto3 JSON mapping, exactly as submitted.
    spec         jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- When CancelSweep was called (first time); NULL if never.
    cancelled_at timestamptz
);

-- ListSweeps: newest first, keyset-paginated on (created_at, id).
CREATE INDEX sweeps_created_idx ON sweeps (created_at DESC, id DESC);

COMMENT ON TABLE sweeps IS
    'One row per sweep (SubmitSweep). Its jobs are in sweep_runs; its state is derived from them.';
COMMENT ON COLUMN sweeps.id IS 'The sweep id (UUID).';
COMMENT ON COLUMN sweeps.name IS 'spec.name; runs are named <name>/<arm>/s<seed>.';
COMMENT ON COLUMN sweeps.kind IS 'Experiment kind of the arms'' runs: cifar_cvae or mnist_classifier (picks the default summary metrics).';
COMMENT ON COLUMN sweeps.labels IS 'spec.labels as a JSON object (every run carries them too).';
COMMENT ON COLUMN sweeps.spec IS 'The SweepSpec in the proto3 JSON mapping, as submitted.';
COMMENT ON COLUMN sweeps.created_at IS 'When it was submitted.';
COMMENT ON COLUMN sweeps.cancelled_at IS 'When CancelSweep was first called; NULL if never.';

CREATE TABLE sweep_arms (
    sweep_id uuid    NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    -- 0-based position in grid order (the first axis varying slowest).
    position integer NOT NULL CHECK (position >= 0),
    name     text    NOT NULL,
    -- The arm's runs start from random initialisation (no transfer): the default baseline when
    -- exactly one arm of the sweep has it.
    baseline boolean NOT NULL,
    PRIMARY KEY (sweep_id, position),
    UNIQUE (sweep_id, name)
);

COMMENT ON TABLE sweep_arms IS 'The arms (grid points) of every sweep, in grid order.';
COMMENT ON COLUMN sweep_arms.sweep_id IS 'The sweep (sweeps.id).';
COMMENT ON COLUMN sweep_arms.position IS '0-based position in grid order (first axis slowest).';
COMMENT ON COLUMN sweep_arms.name IS 'The arm name: its values'' names joined with commas; unique in the sweep.';
COMMENT ON COLUMN sweep_arms.baseline IS
    'True when the arm''s runs use random initialisation (no transfer): the default baseline if it is the only such arm.';

CREATE TABLE sweep_runs (
    sweep_id  uuid          NOT NULL REFERENCES sweeps (id) ON DELETE CASCADE,
    job_id    uuid          NOT NULL UNIQUE REFERENCES jobs (id),
    -- The arm's name; 'source' for a source-stage job.
    arm       text          NOT NULL,
    -- training.seed of the job (uint64, hence numeric).
    seed      numeric(20,0) NOT NULL CHECK (seed >= 0),
    is_source boolean       NOT NULL,
    -- 0-based creation order: the sources first (in spec.seeds order), then arm by arm, seed
    -- by seed. GetSweep lists the runs in this order.
    position  integer       NOT NULL CHECK (position >= 0),
    PRIMARY KEY (sweep_id, position),
    CHECK (is_source = (arm = 'source'))
);

CREATE INDEX sweep_runs_arm_idx ON sweep_runs (sweep_id, arm, seed);

COMMENT ON TABLE sweep_runs IS 'Every job of every sweep, and the part it plays (arm and seed, or source).';
COMMENT ON COLUMN sweep_runs.sweep_id IS 'The sweep (sweeps.id).';
COMMENT ON COLUMN sweep_runs.job_id IS 'The job (jobs.id); a job belongs to at most one sweep.';
COMMENT ON COLUMN sweep_runs.arm IS 'The arm''s name (sweep_arms.name), or source for a source-stage job.';
COMMENT ON COLUMN sweep_runs.seed IS 'The random seed (training.seed, uint64).';
COMMENT ON COLUMN sweep_runs.is_source IS 'True for a source-stage job (an MNIST classifier the transfer arms start from).';
COMMENT ON COLUMN sweep_runs.position IS '0-based creation order: sources first (by spec.seeds order), then arm by arm, seed by seed.';

CREATE TABLE student_t_975 (
    df integer          PRIMARY KEY CHECK (df >= 1),
    t  double precision NOT NULL
);

COMMENT ON TABLE student_t_975 IS
    'The 97.5% quantile of Student''s t with df degrees of freedom (df 1..=100), the factor of a '
    'two-sided 95% confidence interval; beyond 100 the normal quantile 1.959963984540054 is used '
    '(as the coordinator does). Computed with mpmath (50 digits), rounded to double precision.';
COMMENT ON COLUMN student_t_975.df IS 'Degrees of freedom (n - 1 for n seeds).';
COMMENT ON COLUMN student_t_975.t IS 'The quantile t such that P(T <= t) = 0.975.';

INSERT INTO student_t_975 (df, t) VALUES
    (1, 12.706204736174705),
    (2, 4.302652729749464),
    (3, 3.1824463052837095),
    (4, 2.7764451051977943),
    (5, 2.5705818356363155),
    (6, 2.44691185114497),
    (7, 2.3646242515927853),
    (8, 2.3060041352041667),
    (9, 2.2621571627982053),
    (10, 2.228138851986275),
    (11, 2.2009851600916397),
    (12, 2.178812829667229),
    (13, 2.1603686564627926),
    (14, 2.144786687917804),
    (15, 2.1314495455597755),
    (16, 2.1199052992212546),
    (17, 2.109815577833317),
    (18, 2.1009220402410387),
    (19, 2.0930240544083096),
    (20, 2.085963447265865),
    (21, 2.0796138447276804),
    (22, 2.0738730679040263),
    (23, 2.0686576104190486),
    (24, 2.063898561628026),
    (25, 2.0595385527532977),
    (26, 2.055529438642873),
    (27, 2.0518305164802855),
    (28, 2.048407141795245),
    (29, 2.0452296421327043),
    (30, 2.042272456301238),
    (31, 2.0395134463964086),
    (32, 2.036933343460102),
    (33, 2.034515297449339),
    (34, 2.032244509317719),
    (35, 2.0301079282503434),
    (36, 2.028094000980451),
    (37, 2.0261924630291097),
    (38, 2.02439416391197),
    (39, 2.0226909200367613),
    (40, 2.0210753903062733),
    (41, 2.0195409704413763),
    (42, 2.018081702818445),
    (43, 2.0166921992278244),
    (44, 2.015367574443764),
    (45, 2.0141033888808466),
    (46, 2.012895598919429),
    (47, 2.011740513729766),
    (48, 2.0106347576242323),
    (49, 2.0095752371292397),
    (50, 2.008559112100761),
    (51, 2.007583770315836),
    (52, 2.0066468050616884),
    (53, 2.005745995317869),
    (54, 2.004879288188057),
    (55, 2.004044783289146),
    (56, 2.0032407188478722),
    (57, 2.0024654592910074),
    (58, 2.001717484145236),
    (59, 2.000995378088268),
    (60, 2.0002978220142604),
    (61, 1.9996235849949398),
    (62, 1.998971517033379),
    (63, 1.9983405425207417),
    (64, 1.997729654317693),
    (65, 1.997137908392004),
    (66, 1.996564418952312),
    (67, 1.9960083540252966),
    (68, 1.995468931429844),
    (69, 1.994945415107238),
    (70, 1.9944371117711865),
    (71, 1.9939433678456258),
    (72, 1.9934635666618723),
    (73, 1.9929971258898551),
    (74, 1.9925434951809327),
    (75, 1.992102154002242),
    (76, 1.9916726096446644),
    (77, 1.991254395388385),
    (78, 1.9908470688116908),
    (79, 1.990450210230129),
    (80, 1.9900634212544461),
    (81, 1.9896863234569029),
    (82, 1.9893185571365726),
    (83, 1.9889597801751628),
    (84, 1.9886096669757092),
    (85, 1.988267907477222),
    (86, 1.9879342062390206),
    (87, 1.9876082815890712),
    (88, 1.9872898648311697),
    (89, 1.9869786995062815),
    (90, 1.9866745407037683),
    (91, 1.9863771544186182),
    (92, 1.9860863169511305),
    (93, 1.9858018143458234),
    (94, 1.9855234418666043),
    (95, 1.9852510035054982),
    (96, 1.9849843115224575),
    (97, 1.9847231860139847),
    (98, 1.9844674545084817),
    (99, 1.9842169515864174),
    (100, 1.9839715185235522)
;

-- GetSweepSummary with its defaults, as a view. Definitions (the same as the coordinator's):
--   early value of a run  the metric's point with epoch = 1 and the highest step in epoch 1
--   final value of a run  the metric's point with the highest step (the last epoch's point)
--   statistics            over the arm's succeeded runs: n, mean, sample sd (n - 1), and
--                         mean -/+ t(0.975, n - 1) * sd / sqrt(n); sd and interval NULL for n < 2
--   paired difference     arm minus baseline for each seed where both runs succeeded (and both
--                         have the value), then the same statistics
--   baseline              the one arm with random initialisation; when a sweep has none or
--                         several, the diff_* columns are NULL (the RPC can take another arm)
--   default metrics       test/neg_elbo_nats, test/bits_per_dim, test/recon, test/kl for a
--                         cifar_cvae sweep; test/loss, test/accuracy for mnist_classifier
CREATE VIEW sweep_summary AS
WITH metrics AS (
    SELECT s.id AS sweep_id, m.metric, m.ord
    FROM sweeps s
    CROSS JOIN LATERAL unnest(
        CASE s.kind
            WHEN 'cifar_cvae' THEN
                ARRAY['test/neg_elbo_nats', 'test/bits_per_dim', 'test/recon', 'test/kl']
            ELSE ARRAY['test/loss', 'test/accuracy']
        END) WITH ORDINALITY AS m(metric, ord)
),
stages(stage) AS (VALUES ('early'), ('final')),
vals AS (
    SELECT r.sweep_id, r.arm, r.seed, m.metric, st.stage, v.value
    FROM sweep_runs r
    JOIN jobs j ON j.id = r.job_id AND j.state = 'succeeded'
    JOIN metrics m ON m.sweep_id = r.sweep_id
    CROSS JOIN stages st
    CROSS JOIN LATERAL (
        SELECT p.value
        FROM metric_points p
        WHERE p.job_id = r.job_id AND p.name = m.metric
          AND (st.stage = 'final' OR p.epoch = 1)
        ORDER BY p.step DESC
        LIMIT 1
    ) v
    WHERE NOT r.is_source
),
baselines AS (
    SELECT sweep_id, min(name) AS arm
    FROM sweep_arms
    WHERE baseline
    GROUP BY sweep_id
    HAVING count(*) = 1
),
diffs AS (
    SELECT a.sweep_id, a.arm, a.metric, a.stage, a.value - b.value AS value
    FROM vals a
    JOIN baselines bl ON bl.sweep_id = a.sweep_id AND a.arm <> bl.arm
    JOIN vals b ON b.sweep_id = a.sweep_id AND b.arm = bl.arm AND b.seed = a.seed
               AND b.metric = a.metric AND b.stage = a.stage
),
agg AS (
    SELECT sweep_id, arm, metric, stage,
           count(value)::integer AS n, avg(value) AS mean, stddev_samp(value) AS sd
    FROM vals GROUP BY sweep_id, arm, metric, stage
),
dagg AS (
    SELECT sweep_id, arm, metric, stage,
           count(value)::integer AS n, avg(value) AS mean, stddev_samp(value) AS sd
    FROM diffs GROUP BY sweep_id, arm, metric, stage
)
SELECT
    a.sweep_id,
    a.name AS arm,
    a.position AS arm_position,
    (bl.arm IS NOT NULL AND bl.arm = a.name) AS is_baseline,
    m.metric,
    st.stage,
    coalesce(g.n, 0) AS n,
    g.mean,
    CASE WHEN g.n >= 2 THEN g.sd END AS sd,
    CASE WHEN g.n >= 2 THEN
        g.mean - coalesce(t.t, 1.959963984540054) * g.sd / sqrt(g.n) END AS ci_low,
    CASE WHEN g.n >= 2 THEN
        g.mean + coalesce(t.t, 1.959963984540054) * g.sd / sqrt(g.n) END AS ci_high,
    CASE WHEN bl.arm IS NOT NULL AND bl.arm <> a.name THEN coalesce(d.n, 0) END AS diff_n,
    d.mean AS diff_mean,
    CASE WHEN d.n >= 2 THEN d.sd END AS diff_sd,
    CASE WHEN d.n >= 2 THEN
        d.mean - coalesce(dt.t, 1.959963984540054) * d.sd / sqrt(d.n) END AS diff_ci_low,
    CASE WHEN d.n >= 2 THEN
        d.mean + coalesce(dt.t, 1.959963984540054) * d.sd / sqrt(d.n) END AS diff_ci_high
FROM sweep_arms a
JOIN metrics m ON m.sweep_id = a.sweep_id
CROSS JOIN stages st
LEFT JOIN baselines bl ON bl.sweep_id = a.sweep_id
LEFT JOIN agg g ON g.sweep_id = a.sweep_id AND g.arm = a.name AND g.metric = m.metric AND g.stage = st.stage
LEFT JOIN student_t_975 t ON t.df = g.n - 1
LEFT JOIN dagg d ON d.sweep_id = a.sweep_id AND d.arm = a.name AND d.metric = m.metric AND d.stage = st.stage
LEFT JOIN student_t_975 dt ON dt.df = d.n - 1;

COMMENT ON VIEW sweep_summary IS
    'Per sweep, arm, default metric and stage (early: end of epoch 1; final: highest step): '
    'statistics over the arm''s succeeded runs and the paired difference from the baseline arm '
    '(the one random-initialisation arm). The same numbers as GetSweepSummary with its defaults. '
    'Order by sweep_id, arm_position, metric, stage.';
COMMENT ON COLUMN sweep_summary.sweep_id IS 'The sweep (sweeps.id).';
COMMENT ON COLUMN sweep_summary.arm IS 'The arm''s name.';
COMMENT ON COLUMN sweep_summary.arm_position IS '0-based position of the arm in grid order.';
COMMENT ON COLUMN sweep_summary.is_baseline IS 'True for the baseline arm (the one random-initialisation arm).';
COMMENT ON COLUMN sweep_summary.metric IS
    'A default metric: test/neg_elbo_nats, test/bits_per_dim, test/recon, test/kl (CVAE) or test/loss, test/accuracy (classifier).';
COMMENT ON COLUMN sweep_summary.stage IS
    'early: the point with epoch = 1 and the highest step of epoch 1; final: the point with the highest step.';
COMMENT ON COLUMN sweep_summary.n IS 'Succeeded runs of the arm that have the value.';
COMMENT ON COLUMN sweep_summary.mean IS 'Mean over those runs; NULL when n = 0.';
COMMENT ON COLUMN sweep_summary.sd IS 'Sample standard deviation (n - 1 in the denominator); NULL when n < 2.';
COMMENT ON COLUMN sweep_summary.ci_low IS 'mean - t(0.975, n - 1) * sd / sqrt(n) (student_t_975; normal beyond df 100); NULL when n < 2.';
COMMENT ON COLUMN sweep_summary.ci_high IS 'mean + t(0.975, n - 1) * sd / sqrt(n); NULL when n < 2.';
COMMENT ON COLUMN sweep_summary.diff_n IS
    'Seeds where both this arm''s and the baseline''s runs succeeded (and have the value); NULL for the baseline itself or when the sweep has no single baseline.';
COMMENT ON COLUMN sweep_summary.diff_mean IS 'Mean of (arm - baseline) over those seeds; NULL when diff_n is 0 or NULL.';
COMMENT ON COLUMN sweep_summary.diff_sd IS 'Sample standard deviation of the paired differences; NULL when diff_n < 2.';
COMMENT ON COLUMN sweep_summary.diff_ci_low IS 'Lower end of the 95% Student-t interval of the mean difference; NULL when diff_n < 2.';
COMMENT ON COLUMN sweep_summary.diff_ci_high IS 'Upper end of the 95% Student-t interval of the mean difference; NULL when diff_n < 2.';
