//! The chaos suite (issue 4): real coordinator and worker processes against a private Postgres and
//! a private Redis that this test starts itself (initdb into a temporary folder, redis-server on a
//! free port; the machine's shared services are never touched), with many short MNIST jobs in
//! flight while one fault at a time is injected:
//!
//! | scenario              | fault                                                                |
//! |-----------------------|----------------------------------------------------------------------|
//! | `worker-sigkill`      | SIGKILL of a worker mid-training, after its job stored a `resume` state |
//! | `redis-flushall`      | FLUSHALL, then the Redis server is killed and started empty          |
//! | `coordinator-restart` | SIGKILL of the coordinator, started again on the same port           |
//! | `postgres-restart`    | `pg_ctl stop -m fast`, 2 s down, started again; a client keeps submitting |
//! | `worker-race`         | no fault: two workers race for the same ids (each pushed 4 times)    |
//! | `worker-sigterm`      | SIGTERM of a worker mid-training: it hands its job back              |
//!
//! After each scenario every job must have reached exactly one terminal state (succeeded), none
//! may be lost, no metric point may be stored twice, resumed attempts must go on from the newest
//! stored training state (their first step is past zero), and every job must have trained
//! exactly its configured number of steps. The figures (scenario, jobs, completed, lost,
//! duplicated, mean time to recover) are printed and written to
//! `$CARGO_TARGET_TMPDIR/chaos-report.md`; each scenario's process logs are copied to
//! `$CARGO_TARGET_TMPDIR/chaos-logs/<scenario>/`.
//!
//! The scenarios run one after another in one test (they train, so they hold `training_lock`);
//! a scenario that fails is recorded and the next one still runs, and the test fails at the end
//! listing every failed check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use proto::v1::job_service_client::JobServiceClient;
use proto::v1::{self, AttemptOutcome, JobState};
use tests::services::{PrivatePostgres, PrivateRedis};
use tests::*;
use tonic::transport::Channel;

// ---- Job shape: short MNIST classifier runs (about 2-4 s each on one CPU thread) ------------

const TRAIN_EXAMPLES: u64 = 512;
const TEST_EXAMPLES: u64 = 200;
const BATCH: u64 = 32;
const STEPS_PER_EPOCH: u64 = TRAIN_EXAMPLES / BATCH;
const EPOCHS: u64 = 5;
const LOG_EVERY: u64 = 4;
/// Not a divisor of the epoch length, so resumption happens mid-epoch too.
const CHECKPOINT_EVERY: u64 = 10;
const MAX_ATTEMPTS: u64 = 5;
/// Jobs submitted up front in every scenario.
const JOBS: usize = 8;

// ---- Short timings, so faults are noticed within seconds ------------------------------------

const COORDINATOR_FLAGS: &[&str] = &[
    "--lease-timeout-ms",
    "3000",
    "--reconcile-interval-ms",
    "300",
    "--redispatch-after-ms",
    "5000",
    "--retry-backoff-ms",
    "200",
];
const WORKER_FLAGS: &[&str] = &["--heartbeat-ms", "300", "--report-ms", "200"];

/// How long a scenario's jobs may take to finish once the fault is over.
const FINISH_WITHIN: Duration = Duration::from_secs(180);
/// How long we wait for a job to reach the point where the fault is injected.
const ARM_WITHIN: Duration = Duration::from_secs(60);

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn ts_s(t: &Option<proto::Timestamp>) -> Option<f64> {
    t.as_ref()
        .map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9)
}

fn total_steps(epochs: u64) -> u64 {
    epochs * STEPS_PER_EPOCH
}

fn chaos_spec(scenario: &str, i: usize, epochs: u64) -> v1::JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": format!("chaos-{scenario}-{i}"),
        "labels": {"suite": "chaos", "scenario": scenario},
        "training": {
            "epochs": epochs, "batchSize": BATCH, "learningRate": 0.001,
            "optimizer": "OPTIMIZER_ADAM", "seed": i,
            "maxTrainExamples": TRAIN_EXAMPLES, "maxTestExamples": TEST_EXAMPLES,
            "logEverySteps": LOG_EVERY, "checkpointEverySteps": CHECKPOINT_EVERY
        },
        "maxAttempts": MAX_ATTEMPTS,
        "mnistClassifier": {}
    }))
    .expect("chaos spec is valid JSON for JobSpec")
}

/// `train/loss` is reported every LOG_EVERY steps, plus once for a last partial window.
fn expected_loss_steps(total: u64) -> BTreeSet<u64> {
    let mut steps: BTreeSet<u64> = (1..=total / LOG_EVERY).map(|k| k * LOG_EVERY).collect();
    steps.insert(total);
    steps
}

/// Epoch metrics carry the last step of their epoch.
fn expected_epoch_steps(total: u64) -> BTreeSet<u64> {
    (1..=total / STEPS_PER_EPOCH)
        .map(|k| k * STEPS_PER_EPOCH)
        .collect()
}

/// Submits, retrying transient refusals (the coordinator or Postgres being down) until it is
/// acknowledged or `patience` runs out. Every refusal's code is recorded.
async fn submit_retrying(
    client: &mut JobServiceClient<Channel>,
    spec: v1::JobSpec,
    patience: Duration,
    refusals: &mut Vec<tonic::Code>,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + patience;
    loop {
        match client
            .submit_job(v1::SubmitJobRequest {
                spec: Some(spec.clone()),
            })
            .await
        {
            Ok(r) => return Ok(r.into_inner().job_id),
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                bail!("submission refused as invalid: {status}")
            }
            Err(status) => {
                refusals.push(status.code());
                if Instant::now() > deadline {
                    bail!("submission not acknowledged within {patience:?}: {status}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the table reports for one scenario.
struct Row {
    scenario: &'static str,
    jobs: usize,
    completed: usize,
    lost: usize,
    duplicated: usize,
    /// Mean time to recover, in seconds (None: no fault, or nothing recovered).
    mttr_s: Option<f64>,
    affected: usize,
    wall_s: f64,
    notes: String,
}

/// What a scenario expects beyond the checks every scenario makes.
#[derive(Default)]
struct Expect<'a> {
    /// When the fault was injected (unix seconds); None: no fault.
    fault_at: Option<f64>,
    /// The jobs the fault hit, whose recovery is timed.
    affected: &'a [String],
    /// The affected jobs were queued (not running) at the fault: their recovery is counted from
    /// when the worker that claimed them became free, not from the fault.
    affected_were_queued: bool,
    /// Jobs that must show an attempt resumed past step zero right after one that ended so.
    resumed: &'a [(String, AttemptOutcome)],
    /// Exactly one attempt per job (no fault happened).
    single_attempt: bool,
    /// At least this many distinct workers ran attempts.
    min_workers: usize,
}

/// The private services every scenario runs on.
struct Services {
    pg: PrivatePostgres,
    redis: PrivateRedis,
}

/// One scenario's world: a fresh database and Redis prefix on the private services, a coordinator
/// at a fixed address, workers, and the jobs acknowledged so far.
struct World {
    name: &'static str,
    env: TestEnv,
    port: u16,
    coordinator: Option<Coordinator>,
    coordinator_runs: u32,
    workers: BTreeMap<String, Proc>,
    client: JobServiceClient<Channel>,
    pool: sqlx::PgPool,
    /// Acknowledged submissions: id and epochs.
    jobs: Vec<(String, u64)>,
    failures: Vec<String>,
    started: Instant,
    notes: Vec<String>,
}

impl World {
    async fn new(svc: &Services, name: &'static str) -> Self {
        let env = TestEnv::on(svc.pg.server_url(), svc.redis.url());
        let port = free_port();
        let coordinator = env
            .start_coordinator_at("coordinator-1", port, COORDINATOR_FLAGS)
            .await;
        let client = coordinator.client().await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&env.database_url())
            .await
            .expect("connecting to the scenario's database on the private Postgres");
        Self {
            name,
            env,
            port,
            coordinator: Some(coordinator),
            coordinator_runs: 1,
            workers: BTreeMap::new(),
            client,
            pool,
            jobs: Vec::new(),
            failures: Vec::new(),
            started: Instant::now(),
            notes: Vec::new(),
        }
    }

    fn coordinator(&self) -> &Coordinator {
        self.coordinator
            .as_ref()
            .expect("the coordinator is running")
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            let m = msg();
            eprintln!("[chaos {}] FAILED: {m}", self.name);
            self.failures.push(m);
        }
    }

    fn start_worker(&mut self, name: &str) {
        let worker = self.env.start_worker_with_data(
            self.coordinator(),
            name,
            &shared_data_dir(),
            WORKER_FLAGS,
        );
        self.workers.insert(name.to_string(), worker);
    }

    async fn submit_jobs(&mut self, n: usize, epochs: u64) {
        let mut refusals = Vec::new();
        for i in 0..n {
            let spec = chaos_spec(self.name, self.jobs.len() + i, epochs);
            let id = submit_retrying(
                &mut self.client,
                spec,
                Duration::from_secs(30),
                &mut refusals,
            )
            .await
            .unwrap_or_else(|e| panic!("[{}] submitting: {e:#}", self.name));
            self.jobs.push((id, epochs));
        }
    }

    /// SIGKILLs the coordinator.
    fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.proc.kill();
            // Keep the process (and its log) around: dropping it is harmless.
            self.notes
                .push(format!("coordinator-{} killed", self.coordinator_runs));
        }
    }

    /// Starts the coordinator again at the same address (database, prefix, artifact folder).
    async fn start_coordinator_again(&mut self) {
        self.coordinator_runs += 1;
        let name = format!("coordinator-{}", self.coordinator_runs);
        let c = self
            .env
            .start_coordinator_at(&name, self.port, COORDINATOR_FLAGS)
            .await;
        self.coordinator = Some(c);
    }

    /// Jobs in a state, with their worker (SQL; an error reads as none).
    async fn jobs_in_state(&self, state: &str) -> Vec<(String, Option<String>)> {
        sqlx::query_as("SELECT id::text, worker_id FROM jobs WHERE state = $1 ORDER BY id")
            .bind(state)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default()
    }

    /// Newest `train/loss` step of each running job on `worker`.
    async fn running_progress(&self, worker: &str) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT j.id::text, COALESCE(m.step, 0) FROM jobs j
             LEFT JOIN job_metric_latest m ON m.job_id = j.id AND m.name = 'train/loss'
             WHERE j.state = 'running' AND j.worker_id = $1",
        )
        .bind(worker)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
    }

    /// A job running on `worker` whose current attempt stored a `resume` training state and
    /// that is far enough from its end that it cannot finish before the fault lands.
    async fn resumable_victim(&self, worker: &str) -> Option<String> {
        let limit = i64::try_from(total_steps(EPOCHS)).expect("small") - 20;
        sqlx::query_scalar(
            "SELECT j.id::text FROM jobs j
             LEFT JOIN job_metric_latest m ON m.job_id = j.id AND m.name = 'train/loss'
             WHERE j.state = 'running' AND j.worker_id = $1
               AND EXISTS (SELECT 1 FROM artifacts a WHERE a.job_id = j.id
                           AND a.attempt = j.attempt AND a.kind = 'resume')
               AND COALESCE(m.step, 0) <= $2
             LIMIT 1",
        )
        .bind(worker)
        .bind(limit)
        .fetch_optional(&self.pool)
        .await
        .ok()
        .flatten()
    }

    /// Waits for a job on `worker` to be mid-training after storing a resume state. When none
    /// stores one within ARM_WITHIN (the worker does not write them), records the failure and
    /// falls back to any job of `worker` mid-training, so the other checks still run.
    async fn arm_on_resumable_job(&mut self, worker: &str) -> String {
        let deadline = Instant::now() + ARM_WITHIN;
        loop {
            if let Some(id) = self.resumable_victim(worker).await {
                return id;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.check(false, || {
            format!(
                "no job running on {worker} stored a `resume` training state within \
                 {ARM_WITHIN:?} (checkpointEverySteps={CHECKPOINT_EVERY}): the fault is \
                 injected without one"
            )
        });
        let limit = i64::try_from(total_steps(EPOCHS)).expect("small") - 20;
        let deadline = Instant::now() + ARM_WITHIN;
        loop {
            if let Some((id, _)) = self
                .running_progress(worker)
                .await
                .into_iter()
                .find(|(_, step)| (8..=limit).contains(step))
            {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] no job trained on {worker} within {ARM_WITHIN:?}:\n{}",
                self.name,
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `n` jobs run and each reported at least `min_step` steps.
    async fn wait_running(&mut self, n: usize, min_step: i64) {
        let deadline = Instant::now() + ARM_WITHIN;
        loop {
            let progressed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM jobs j JOIN job_metric_latest m
                 ON m.job_id = j.id AND m.name = 'train/loss'
                 WHERE j.state = 'running' AND m.step >= $1",
            )
            .bind(min_step)
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0);
            if progressed >= i64::try_from(n).expect("small") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "[{}] {n} jobs were not training (step >= {min_step}) within {ARM_WITHIN:?}:\n{}",
                self.name,
                self.log_tails()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of every process log of this scenario.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.env.dir.path()) {
            let mut paths: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            paths.sort();
            for p in paths {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(25);
                out.push_str(&format!("---- {} (last 25 lines) ----\n", p.display()));
                for l in &lines[from..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Copies the scenario's logs to $CARGO_TARGET_TMPDIR/chaos-logs/<scenario>/.
    fn keep_logs(&self) {
        let to = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("chaos-logs")
            .join(self.name);
        let _ = std::fs::remove_dir_all(&to);
        if std::fs::create_dir_all(&to).is_err() {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(self.env.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    if let Some(name) = p.file_name() {
                        let _ = std::fs::copy(&p, to.join(name));
                    }
                }
            }
        }
    }

    /// GetJob, retried through transient errors for up to 20 s.
    async fn get_job(&mut self, id: &str) -> anyhow::Result<v1::Job> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self
                .client
                .get_job(v1::GetJobRequest { job_id: id.into() })
                .await
            {
                Ok(j) => return Ok(j.into_inner()),
                Err(s) if s.code() == tonic::Code::NotFound => bail!("job {id} not found"),
                Err(s) if Instant::now() > deadline => bail!("GetJob {id}: {s}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn resume_artifacts(&mut self, id: &str) -> anyhow::Result<Vec<v1::Artifact>> {
        Ok(self
            .client
            .list_artifacts(v1::ListArtifactsRequest {
                job_id: id.into(),
                kind: "resume".into(),
            })
            .await
            .context("ListArtifacts")?
            .into_inner()
            .artifacts)
    }

    /// Waits until every job in the database is terminal (or FINISH_WITHIN passes).
    async fn wait_all_terminal(&mut self) {
        let deadline = Instant::now() + FINISH_WITHIN;
        loop {
            let open: Result<Vec<(String, String, i32)>, _> = sqlx::query_as(
                "SELECT id::text, state, attempt FROM jobs
                 WHERE state NOT IN ('succeeded', 'failed', 'cancelled') ORDER BY id",
            )
            .fetch_all(&self.pool)
            .await;
            if let Ok(open) = open {
                if open.is_empty() {
                    return;
                }
                if Instant::now() > deadline {
                    let tails = self.log_tails();
                    self.check(false, || {
                        format!(
                            "{} jobs not terminal {FINISH_WITHIN:?} after the fault: {open:?}\n{tails}",
                            open.len()
                        )
                    });
                    return;
                }
            } else if Instant::now() > deadline {
                self.check(false, || {
                    "the scenario's database stayed unreachable".into()
                });
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The checks every scenario ends with. `fault_at` (unix seconds) and `affected` give the
    /// mean time to recover; `resumed` are jobs that must show a later attempt resumed past
    /// step zero; `single_attempt` requires exactly one attempt per job.
    async fn finish(mut self, expect: Expect<'_>) -> (Row, Vec<String>) {
        let Expect {
            fault_at,
            affected,
            affected_were_queued,
            resumed,
            single_attempt,
            min_workers,
        } = expect;
        self.wait_all_terminal().await;

        // Every job the database holds, and every acknowledged one.
        let in_db: Vec<(String, serde_json::Value)> =
            sqlx::query_as("SELECT id::text, spec FROM jobs ORDER BY created_at")
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        let acknowledged: BTreeSet<String> = self.jobs.iter().map(|(id, _)| id.clone()).collect();
        let mut epochs_of: BTreeMap<String, u64> = self.jobs.iter().cloned().collect();
        for (id, spec) in &in_db {
            let e = spec["training"]["epochs"].as_u64().unwrap_or(0);
            epochs_of.entry(id.clone()).or_insert(e);
        }
        let db_ids: BTreeSet<String> = in_db.iter().map(|(id, _)| id.clone()).collect();
        let mut lost = 0;
        for id in acknowledged.difference(&db_ids) {
            lost += 1;
            self.check(false, || {
                format!("acknowledged job {id} is not in the database")
            });
        }
        let unacknowledged = db_ids.difference(&acknowledged).count();
        if unacknowledged > 0 {
            self.notes.push(format!(
                "{unacknowledged} stored submissions were never acknowledged (retried)"
            ));
        }

        // No metric point stored twice, in the whole database.
        let (rows, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (job_id, name, step)) FROM metric_points",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap_or((0, 0));
        let mut duplicated = usize::try_from(rows - distinct).unwrap_or(0);
        self.check(rows == distinct, || {
            format!("{} metric points stored twice", rows - distinct)
        });

        let mut completed = 0;
        let mut finished: BTreeMap<String, v1::Job> = BTreeMap::new();
        for id in db_ids.iter().chain(acknowledged.difference(&db_ids)) {
            let total = total_steps(epochs_of.get(id).copied().unwrap_or(EPOCHS));
            let job = match self.get_job(id).await {
                Ok(j) => j,
                Err(e) => {
                    if db_ids.contains(id) {
                        lost += 1;
                    }
                    self.check(false, || format!("GetJob {id}: {e:#}"));
                    continue;
                }
            };
            if job.state() == JobState::Succeeded {
                completed += 1;
            } else {
                if !is_terminal(job.state()) {
                    lost += 1;
                }
                self.check(false, || {
                    format!(
                        "job {id} ended {:?} (error {:?}), not succeeded; attempts {:?}",
                        job.state(),
                        job.error,
                        job.attempts
                    )
                });
            }
            let succeeded_attempts = job
                .attempts
                .iter()
                .filter(|a| a.outcome() == AttemptOutcome::Succeeded)
                .count();
            if succeeded_attempts > 1 {
                duplicated += succeeded_attempts - 1;
            }
            self.check_job(id, &job, total, single_attempt).await;
            finished.insert(id.clone(), job);
        }

        // Both workers must have taken part where that is the point of the scenario.
        let workers: BTreeSet<&str> = finished
            .values()
            .flat_map(|j| j.attempts.iter().map(|a| a.worker_id.as_str()))
            .collect();
        self.check(workers.len() >= min_workers, || {
            format!("only workers {workers:?} ran jobs; expected at least {min_workers}")
        });

        // Recovery of each affected job: its first claim or stored metric point after the
        // fault (for a job that was queued, counted from when its worker became free).
        let mut recoveries = Vec::new();
        if let Some(t0) = fault_at {
            for id in affected {
                let Some(job) = finished.get(id) else {
                    continue;
                };
                let first_claim = job
                    .attempts
                    .iter()
                    .filter_map(|a| ts_s(&a.claimed_at).map(|t| (t, a.worker_id.clone())))
                    .filter(|(t, _)| *t > t0)
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                let claim = first_claim.as_ref().map_or(f64::INFINITY, |c| c.0);
                let mut from = t0;
                if let (true, Some((claimed, worker))) = (affected_were_queued, &first_claim) {
                    // The end of that worker's previous attempt (of any job), if after the fault.
                    let free_since = finished
                        .values()
                        .flat_map(|j| j.attempts.iter())
                        .filter(|a| &a.worker_id == worker)
                        .filter_map(|a| ts_s(&a.ended_at))
                        .filter(|e| *e <= *claimed)
                        .fold(t0, f64::max);
                    from = free_since;
                }
                let point: Option<f64> = sqlx::query_scalar(
                    "SELECT extract(epoch FROM min(recorded_at))::float8 FROM metric_points
                     WHERE job_id = $1::uuid AND recorded_at > to_timestamp($2)",
                )
                .bind(id)
                .bind(t0)
                .fetch_one(&self.pool)
                .await
                .ok()
                .flatten();
                let first = claim.min(point.unwrap_or(f64::INFINITY));
                if first.is_finite() {
                    recoveries.push((first - from).max(0.0));
                } else {
                    self.check(false, || {
                        format!("job {id} made no progress after the fault (no claim, no metric)")
                    });
                }
            }
        }

        // Jobs that must have resumed from a stored state after a crash or a hand-back.
        for (id, outcome) in resumed {
            let Some(job) = finished.get(id) else {
                continue;
            };
            let after = job
                .attempts
                .iter()
                .position(|a| a.outcome() == *outcome)
                .and_then(|i| job.attempts.get(i + 1));
            self.check(after.is_some_and(|a| a.resumed_from_step > 0), || {
                format!(
                    "job {id}: no attempt after one that ended {outcome:?} resumed past step \
                     zero; attempts {:?}",
                    job.attempts
                )
            });
        }

        let mttr_s = if recoveries.is_empty() {
            None
        } else {
            Some(recoveries.iter().sum::<f64>() / recoveries.len() as f64)
        };
        self.keep_logs();
        let row = Row {
            scenario: self.name,
            jobs: db_ids.union(&acknowledged).count(),
            completed,
            lost,
            duplicated,
            mttr_s,
            affected: recoveries.len(),
            wall_s: self.started.elapsed().as_secs_f64(),
            notes: self.notes.join("; "),
        };
        let failures = std::mem::take(&mut self.failures);
        (row, failures)
    }

    /// Per-job checks: exactly one terminal state and one successful attempt, a consistent
    /// attempt history, exactly the configured steps, and resumption from the newest state.
    async fn check_job(&mut self, id: &str, job: &v1::Job, total: u64, single_attempt: bool) {
        let attempts = &job.attempts;
        let n = attempts.len();
        self.check(n >= 1, || format!("job {id}: no attempt history ({job:?})"));
        self.check(u32::try_from(n).ok() == Some(job.attempt), || {
            format!(
                "job {id}: attempt = {} but {n} attempts recorded: {attempts:?}",
                job.attempt
            )
        });
        if single_attempt {
            self.check(n == 1, || {
                format!("job {id}: {n} attempts with no fault: {attempts:?}")
            });
        }
        for (i, a) in attempts.iter().enumerate() {
            self.check(a.attempt as usize == i + 1, || {
                format!("job {id}: attempts out of order: {attempts:?}")
            });
        }
        let succeeded = attempts
            .iter()
            .filter(|a| a.outcome() == AttemptOutcome::Succeeded)
            .count();
        if job.state() == JobState::Succeeded {
            self.check(
                succeeded == 1 && attempts.last().map(|a| a.outcome()) == Some(AttemptOutcome::Succeeded),
                || format!("job {id}: succeeded, but not through exactly one final successful attempt: {attempts:?}"),
            );
        }
        self.check(
            attempts.iter().all(|a| {
                !matches!(
                    a.outcome(),
                    AttemptOutcome::Running | AttemptOutcome::Unspecified
                ) && a.ended_at.is_some()
            }),
            || format!("job {id}: an attempt of a finished job is still open: {attempts:?}"),
        );
        // No job ran on two workers at once: each attempt ended before the next was claimed.
        for w in attempts.windows(2) {
            let (end, next) = (ts_s(&w[0].ended_at), ts_s(&w[1].claimed_at));
            self.check(
                matches!((end, next), (Some(e), Some(c)) if e <= c + 1e-3),
                || {
                    format!(
                        "job {id}: attempts {} and {} overlap: {attempts:?}",
                        w[0].attempt, w[1].attempt
                    )
                },
            );
        }
        let failed = attempts
            .iter()
            .filter(|a| {
                matches!(
                    a.outcome(),
                    AttemptOutcome::Failed | AttemptOutcome::LeaseExpired
                )
            })
            .count();
        self.check(job.failed_attempts as usize == failed, || {
            format!(
                "job {id}: failed_attempts = {} but {failed} attempts failed or expired (hand-backs do not count): {attempts:?}",
                job.failed_attempts
            )
        });

        if job.state() == JobState::Succeeded {
            self.check(job.final_step == total, || {
                format!(
                    "job {id}: final_step {} != configured {total}",
                    job.final_step
                )
            });
            let points: Vec<(String, i64)> = sqlx::query_as(
                "SELECT name, step FROM metric_points WHERE job_id = $1::uuid ORDER BY name, step",
            )
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
            let steps_of = |name: &str| -> BTreeSet<u64> {
                points
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, s)| u64::try_from(*s).unwrap_or(u64::MAX))
                    .collect()
            };
            let loss = steps_of("train/loss");
            let expected = expected_loss_steps(total);
            self.check(loss == expected, || {
                format!(
                    "job {id}: train/loss steps {:?} != expected {:?} (missing {:?}, extra {:?})",
                    loss,
                    expected,
                    expected.difference(&loss).collect::<Vec<_>>(),
                    loss.difference(&expected).collect::<Vec<_>>()
                )
            });
            let acc = steps_of("test/accuracy");
            let expected = expected_epoch_steps(total);
            self.check(acc == expected, || {
                format!("job {id}: test/accuracy steps {acc:?} != one per epoch {expected:?}")
            });
            let beyond: Vec<&(String, i64)> = points
                .iter()
                .filter(|(_, s)| u64::try_from(*s).unwrap_or(u64::MAX) > total)
                .collect();
            self.check(beyond.is_empty(), || {
                format!("job {id}: points past the configured {total} steps: {beyond:?}")
            });
        }

        // Resumption: a later attempt resumes from the newest state an earlier attempt stored,
        // and then stores only states past it (it did not start over from step zero).
        if n > 1 {
            let resume = match self.resume_artifacts(id).await {
                Ok(r) => r,
                Err(e) => {
                    self.check(false, || {
                        format!("job {id}: listing resume artifacts: {e:#}")
                    });
                    return;
                }
            };
            for a in attempts.iter().skip(1) {
                let newest_before = resume
                    .iter()
                    .filter(|r| r.attempt < a.attempt)
                    .map(|r| r.step)
                    .max()
                    .unwrap_or(0);
                self.check(a.resumed_from_step == newest_before, || {
                    format!(
                        "job {id}: attempt {} resumed from step {} but the newest state stored \
                         before it is at step {newest_before}; resume artifacts {:?}",
                        a.attempt,
                        a.resumed_from_step,
                        resume
                            .iter()
                            .map(|r| (r.attempt, r.step))
                            .collect::<Vec<_>>()
                    )
                });
                let own: Vec<u64> = resume
                    .iter()
                    .filter(|r| r.attempt == a.attempt)
                    .map(|r| r.step)
                    .collect();
                self.check(own.iter().all(|s| *s > a.resumed_from_step), || {
                    format!(
                        "job {id}: attempt {} resumed from step {} but stored states at steps \
                         {own:?}: it trained again from an earlier step",
                        a.attempt, a.resumed_from_step
                    )
                });
            }
        }
    }
}

/// Shared setup of the scenarios where one worker is hit while another keeps going: `w1` and
/// `w2` train; the victim is a job `w1` holds mid-training after storing a resume state.
async fn two_workers_with_jobs(svc: &Services, name: &'static str) -> World {
    let mut w = World::new(svc, name).await;
    w.submit_jobs(JOBS, EPOCHS).await;
    w.start_worker("w1");
    w.start_worker("w2");
    w
}

/// (a) SIGKILL of a worker mid-training, after its job stored at least one training state.
async fn worker_sigkill(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "worker-sigkill").await;
    let victim = w.arm_on_resumable_job("w1").await;
    let t0 = now_s();
    if let Some(mut p) = w.workers.remove("w1") {
        p.kill();
        w.workers.insert("w1-killed".into(), p);
    }
    let affected: Vec<String> = w
        .jobs_in_state("running")
        .await
        .into_iter()
        .filter(|(_, worker)| worker.as_deref() == Some("w1"))
        .map(|(id, _)| id)
        .collect();
    w.start_worker("w3");
    w.notes.push(format!("killed w1 holding {victim}"));
    let affected = if affected.is_empty() {
        vec![victim.clone()]
    } else {
        affected
    };
    w.finish(Expect {
        fault_at: Some(t0),
        affected: &affected,
        resumed: &[(victim, AttemptOutcome::LeaseExpired)],
        ..Expect::default()
    })
    .await
}

/// (b) FLUSHALL on Redis, then the server is killed and started again, empty, on its port,
/// while jobs are queued (their ids are lost) and running.
async fn redis_flushall(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "redis-flushall").await;
    w.wait_running(2, 4).await;
    let queued: Vec<String> = w
        .jobs_in_state("queued")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let t0 = now_s();
    svc.redis.flushall().expect("FLUSHALL on the private Redis");
    tokio::task::block_in_place(|| svc.redis.restart(Duration::from_millis(1000)))
        .expect("restarting the private Redis");
    w.notes.push(format!(
        "{} queued ids flushed; Redis down 1 s",
        queued.len()
    ));
    w.check(!queued.is_empty(), || {
        "no job was queued when Redis was flushed: the scenario did not test lost ids".into()
    });
    w.finish(Expect {
        fault_at: Some(t0),
        affected: &queued,
        affected_were_queued: true,
        min_workers: 2,
        ..Expect::default()
    })
    .await
}

/// (c) SIGKILL of the coordinator while workers train; started again on the same port.
async fn coordinator_restart(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "coordinator-restart").await;
    w.wait_running(2, 8).await;
    let running: Vec<String> = w
        .jobs_in_state("running")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let t0 = now_s();
    w.kill_coordinator();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    w.start_coordinator_again().await;
    w.client = w.coordinator().client().await;
    w.notes
        .push(format!("down {:.1} s until serving again", now_s() - t0));
    w.finish(Expect {
        fault_at: Some(t0),
        affected: &running,
        min_workers: 2,
        ..Expect::default()
    })
    .await
}

/// (d) Postgres stopped (fast) for 2 s and started again while workers train and a client keeps
/// submitting; refusals during the outage are retried, and every acknowledged job must exist.
async fn postgres_restart(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "postgres-restart").await;
    w.wait_running(2, 8).await;

    // A client that keeps submitting (short jobs, 2 epochs) through the outage.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut client = w.client.clone();
    let submitter = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut refusals = Vec::new();
        let mut errors = Vec::new();
        let mut i = 100;
        while !*stop_rx.borrow() {
            i += 1;
            let spec = chaos_spec("postgres-restart", i, 2);
            match submit_retrying(&mut client, spec, Duration::from_secs(60), &mut refusals).await {
                Ok(id) => acked.push((id, 2u64)),
                Err(e) => errors.push(format!("{e:#}")),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(700)) => {}
                _ = stop_rx.changed() => {}
            }
        }
        (acked, refusals, errors)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let running: Vec<String> = w
        .jobs_in_state("running")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let t0 = now_s();
    tokio::task::block_in_place(|| svc.pg.restart(Duration::from_secs(2)))
        .unwrap_or_else(|e| panic!("restarting the private Postgres: {e:#}\n{}", svc.pg.log()));
    let down = now_s() - t0;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    let (acked, refusals, errors) = submitter.await.expect("submitter task");
    let unavailable = refusals
        .iter()
        .filter(|c| **c == tonic::Code::Unavailable)
        .count();
    let other: Vec<&tonic::Code> = refusals
        .iter()
        .filter(|c| **c != tonic::Code::Unavailable)
        .collect();
    w.notes.push(format!(
        "Postgres down {down:.1} s; {} submitted during the run, {unavailable} UNAVAILABLE refusals retried",
        acked.len()
    ));
    w.check(errors.is_empty(), || {
        format!("submissions never acknowledged: {errors:?}")
    });
    w.check(other.is_empty(), || {
        format!("submissions during the Postgres outage were refused with codes other than UNAVAILABLE: {other:?}")
    });
    w.jobs.extend(acked);
    w.finish(Expect {
        fault_at: Some(t0),
        affected: &running,
        min_workers: 2,
        ..Expect::default()
    })
    .await
}

/// (e) Two workers race for the same jobs: every id is pushed three more times, and both
/// workers start at once. No fault; each job must run exactly once.
async fn worker_race(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = World::new(svc, "worker-race").await;
    w.submit_jobs(JOBS, EPOCHS).await;
    {
        let mut conn = svc.redis.connection().expect("redis connection");
        let key = proto::queue::Keys::new(w.env.redis_prefix.clone()).ready_queue();
        for (id, _) in &w.jobs {
            for _ in 0..3 {
                let _: i64 = redis::cmd("RPUSH")
                    .arg(&key)
                    .arg(id)
                    .query(&mut conn)
                    .expect("RPUSH duplicate id");
            }
        }
    }
    w.start_worker("w1");
    w.start_worker("w2");
    w.notes.push("every id pushed 4 times".into());
    // Both workers must have taken part, or there was no race.
    w.finish(Expect {
        single_attempt: true,
        min_workers: 2,
        ..Expect::default()
    })
    .await
}

/// (f) SIGTERM of a worker mid-training: it stops at a step boundary and hands its job back,
/// which does not count as a failure and resumes on another worker.
async fn worker_sigterm(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "worker-sigterm").await;
    let victim = w.arm_on_resumable_job("w1").await;
    let t0 = now_s();
    let mut p = w.workers.remove("w1").expect("w1 runs");
    let exit = tokio::task::block_in_place(|| p.terminate(Duration::from_secs(30)));
    let exited_after = now_s() - t0;
    match &exit {
        Ok(status) => {
            w.notes.push(format!(
                "w1 exited {exited_after:.1} s after SIGTERM ({status})"
            ));
            let ok = status.success();
            w.check(ok, || format!("w1 exited with {status} after SIGTERM"));
        }
        Err(e) => {
            let msg = format!("{e:#}");
            w.check(false, || msg);
        }
    }
    w.workers.insert("w1-terminated".into(), p);
    w.start_worker("w3");
    w.finish(Expect {
        fault_at: Some(t0),
        affected: std::slice::from_ref(&victim),
        resumed: &[(victim.clone(), AttemptOutcome::HandedBack)],
        ..Expect::default()
    })
    .await
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| scenario | jobs | completed | lost | duplicated | mean time to recover | affected jobs | wall time | notes |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let mttr = r
            .mttr_s
            .map(|m| format!("{m:.2} s"))
            .unwrap_or_else(|| "–".into());
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} s | {} |\n",
            r.scenario,
            r.jobs,
            r.completed,
            r.lost,
            r.duplicated,
            mttr,
            r.affected,
            r.wall_s,
            r.notes
        ));
    }
    s
}

/// The suite. Mean time to recover: for each job the fault affected (the jobs the killed or
/// terminated worker held; the jobs queued when Redis was flushed; the jobs running when the
/// coordinator or Postgres went down), the time from the fault's injection to the job's first
/// sign of progress after it: a claim (Attempt.claimed_at) or a stored metric point
/// (metric_points.recorded_at), whichever comes first; averaged over those jobs. It includes
/// the time the service is down, and the lease timeout (3 s) where a lease must expire. For the
/// jobs that were queued at the fault it is counted from when the worker that claimed them
/// became free (the end of that worker's previous attempt, if after the fault), so it measures
/// how long a free worker waited for a lost id, not the queue's length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The lock is held for the whole test on purpose: it keeps other training tests of this binary
// from running during the suite; nothing else in the test takes it.
#[allow(clippy::await_holding_lock)]
async fn every_job_survives_worker_kills_redis_loss_and_coordinator_and_postgres_restarts_exactly_once(
) {
    let _guard = training_lock();
    let suite_started = Instant::now();
    // Loud failures when a tool or the data is missing (never a silent skip).
    let _ = binary("trainq-server");
    let _ = binary("trainq-worker");
    let _ = shared_data_dir();
    let mut svc = Services {
        pg: PrivatePostgres::start_new().expect("starting a private Postgres"),
        redis: PrivateRedis::start_new().expect("starting a private Redis"),
    };
    eprintln!(
        "[chaos] private Postgres on port {}, private Redis on port {}",
        svc.pg.port(),
        svc.redis.port()
    );

    let mut rows = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    type Scenario = for<'a> fn(
        &'a mut Services,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = (Row, Vec<String>)> + Send + 'a>,
    >;
    let scenarios: Vec<(&str, Scenario)> = vec![
        ("worker-sigkill", |s| Box::pin(worker_sigkill(s))),
        ("redis-flushall", |s| Box::pin(redis_flushall(s))),
        ("coordinator-restart", |s| Box::pin(coordinator_restart(s))),
        ("postgres-restart", |s| Box::pin(postgres_restart(s))),
        ("worker-race", |s| Box::pin(worker_race(s))),
        ("worker-sigterm", |s| Box::pin(worker_sigterm(s))),
    ];
    let only = std::env::var("TRAINQ_CHAOS_ONLY").ok();
    for (name, run) in scenarios {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|n| n == name))
        {
            continue;
        }
        eprintln!("[chaos] scenario {name} ...");
        let started = Instant::now();
        let (row, failed) = run(&mut svc).await;
        eprintln!(
            "[chaos] scenario {name}: {} of {} jobs completed, {} failed checks, {:.0} s",
            row.completed,
            row.jobs,
            failed.len(),
            started.elapsed().as_secs_f64()
        );
        failures.extend(failed.into_iter().map(|f| format!("[{name}] {f}")));
        rows.push(row);
    }

    let report = format!(
        "# Chaos suite\n\nJobs: MNIST classifier, {TRAIN_EXAMPLES} train / {TEST_EXAMPLES} test \
         images, batch {BATCH}, {EPOCHS} epochs ({} steps), train/loss every {LOG_EVERY} steps, \
         training state every {CHECKPOINT_EVERY} steps, max {MAX_ATTEMPTS} attempts; {JOBS} jobs \
         per scenario, 2 workers (1 torch thread each). Coordinator: {}. Workers: {}.\n\n{}\n\
         Total: {:.0} s, {} failed checks.\n",
        total_steps(EPOCHS),
        COORDINATOR_FLAGS.join(" "),
        WORKER_FLAGS.join(" "),
        table(&rows),
        suite_started.elapsed().as_secs_f64(),
        failures.len()
    );
    eprintln!("{report}");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.md");
    std::fs::write(&path, &report).expect("writing the chaos report");
    eprintln!("[chaos] report written to {}", path.display());
    assert!(
        failures.is_empty(),
        "{} chaos checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The harness itself: the private Postgres keeps its data across a restart on the same port,
/// and the private Redis comes back empty after FLUSHALL and a restart on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_postgres_and_redis_restart_on_their_ports() {
    let mut pg = PrivatePostgres::start_new().expect("private postgres");
    let url = pg.url("postgres");
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    sqlx::query("CREATE TABLE t (x int)")
        .execute(&pool)
        .await
        .expect("create");
    sqlx::query("INSERT INTO t VALUES (7)")
        .execute(&pool)
        .await
        .expect("insert");
    pool.close().await;
    tokio::task::block_in_place(|| pg.restart(Duration::from_millis(200))).expect("restart");
    let pool = sqlx::PgPool::connect(&url).await.expect("reconnect");
    let x: i32 = sqlx::query_scalar("SELECT x FROM t")
        .fetch_one(&pool)
        .await
        .expect("select");
    assert_eq!(x, 7);
    pool.close().await;

    let mut redis = PrivateRedis::start_new().expect("private redis");
    let mut conn = redis.connection().expect("conn");
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut conn)
        .expect("set");
    redis.flushall().expect("flushall");
    let v: Option<String> = redis::cmd("GET").arg("k").query(&mut conn).expect("get");
    assert_eq!(v, None);
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query(&mut conn)
        .expect("set");
    tokio::task::block_in_place(|| redis.restart(Duration::from_millis(100))).expect("restart");
    let mut conn = redis.connection().expect("conn after restart");
    let v: Option<String> = redis::cmd("GET").arg("k").query(&mut conn).expect("get");
    assert_eq!(v, None, "nothing is persisted across a restart");
}
