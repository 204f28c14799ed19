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
//! | `postgres-restart`    | `pg_ctl stop -m fast`, 7 s down, started again; a client keeps submitting |
//! | `worker-race`         | no fault: two workers race for the same ids (each pushed 4 times)    |
//! | `worker-sigterm`      | SIGTERM of a worker mid-training: it hands its job back              |
//! | `slots-sigkill`       | two workers with `--slots 2`; SIGKILL of one while both its slots train |
//!
//! After each scenario every job must have reached exactly one terminal state (succeeded), none
//! may be lost, no metric point may be stored twice, resumed attempts must go on from the newest
//! stored training state (their first step is past zero), and every job must have trained
//! exactly its configured number of steps. The figures (scenario, jobs, completed, lost,
//! duplicated, mean time to recover) are printed and written to
//! `$CARGO_TARGET_TMPDIR/chaos-report.md`; each scenario's process logs are copied to
//! `$CARGO_TARGET_TMPDIR/chaos-logs/<scenario>/`.
//!
//! The scenarios run one after another in one test (they train, so they hold `training_lock`).
//! A failed check is recorded and the next scenario still runs; the test fails at the end listing
//! every failed check. (A scenario that cannot even reach the point where its fault is injected
//! panics at once, with the process logs.) `TRAINQ_CHAOS_ONLY=worker-sigkill,worker-race` runs
//! only the named scenarios, for debugging. It takes 100 s on an idle 2-core machine, under 3
//! minutes on a busy one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use proto::v1::job_service_client::JobServiceClient;
use proto::v1::{self, AttemptOutcome, JobState};
use tests::services::{PrivatePostgres, PrivateRedis};
use tests::*;
use tonic::transport::Channel;

// ---- Job shape: short MNIST classifier runs (5-7 s each on one CPU thread, state uploads
// included) --------------------------------------------------------------------------------

const TRAIN_EXAMPLES: u64 = 512;
const TEST_EXAMPLES: u64 = 200;
const BATCH: u64 = 32;
const STEPS_PER_EPOCH: u64 = TRAIN_EXAMPLES / BATCH;
const EPOCHS: u64 = 3;
const LOG_EVERY: u64 = 4;
/// Not a divisor of the epoch length, so resumption happens mid-epoch too.
const CHECKPOINT_EVERY: u64 = 12;
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
                request_id: String::new(),
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
    /// Metric points count as progress only when stored after this instant (default: the
    /// fault), for a fault that takes a while to take effect.
    progress_after: Option<f64>,
    /// Only a new claim shows that an affected job recovered (its attempt was interrupted; metric
    /// points its dead worker sent just before the fault may still be stored after it).
    recover_by_claim: bool,
    /// Jobs that must show an attempt resumed past step zero right after one that ended so,
    /// from a state at least as new as the given step (the newest stored at the fault).
    resumed: &'a [(String, AttemptOutcome, u64)],
    /// Exactly one attempt per job (no fault happened).
    single_attempt: bool,
    /// The affected jobs' attempts survived the fault: none of their attempts ended with an
    /// expired lease (an outage of the coordinator or Postgres must not cost running jobs).
    keep_leases: bool,
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
    /// When each worker was started and, if it was, stopped (unix seconds).
    lifetimes: BTreeMap<String, (f64, Option<f64>)>,
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
            lifetimes: BTreeMap::new(),
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
        self.start_worker_with(name, &[]);
    }

    /// A worker with `extra` flags after [`WORKER_FLAGS`].
    fn start_worker_with(&mut self, name: &str, extra: &[&str]) {
        let flags: Vec<&str> = WORKER_FLAGS.iter().chain(extra).copied().collect();
        let worker =
            self.env
                .start_worker_with_data(self.coordinator(), name, &shared_data_dir(), &flags);
        self.workers.insert(name.to_string(), worker);
        self.lifetimes.insert(name.to_string(), (now_s(), None));
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

    /// SIGKILLs `worker` (kept, as `<worker>-killed`, for its log) and records when; returns that
    /// instant (unix seconds).
    fn kill_worker(&mut self, worker: &str) -> f64 {
        let t0 = now_s();
        if let Some(mut p) = self.workers.remove(worker) {
            p.kill();
            self.workers.insert(format!("{worker}-killed"), p);
        }
        self.died(worker, t0);
        t0
    }

    /// Records that a worker stopped at `at` (unix seconds).
    fn died(&mut self, worker: &str, at: f64) {
        if let Some(life) = self.lifetimes.get_mut(worker) {
            life.1 = Some(at);
        }
    }

    /// The step of the newest `resume` state attempts up to `attempt` of the job stored (0: none).
    async fn newest_state(&mut self, id: &str, attempt: u32) -> u64 {
        match self.resume_artifacts(id).await {
            Ok(states) => states
                .iter()
                .filter(|a| a.attempt <= attempt)
                .map(|a| a.step)
                .max()
                .unwrap_or(0),
            Err(e) => {
                let msg = format!("job {id}: listing resume artifacts: {e:#}");
                self.check(false, || msg);
                0
            }
        }
    }

    /// The job's current attempt (SQL).
    async fn attempt_of(&self, id: &str) -> u32 {
        let attempt: i32 = sqlx::query_scalar("SELECT attempt FROM jobs WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("reading the victim's attempt");
        u32::try_from(attempt).expect("attempt >= 0")
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

    /// Ids of the jobs in a state, held by `worker` if one is given (SQL; an error reads as
    /// none).
    async fn jobs_in_state(&self, state: &str, worker: Option<&str>) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT id::text FROM jobs
             WHERE state = $1 AND ($2::text IS NULL OR worker_id = $2) ORDER BY id",
        )
        .bind(state)
        .bind(worker)
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
            recover_by_claim,
            progress_after,
            resumed,
            single_attempt,
            keep_leases,
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
                if !job.state().is_terminal() {
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
            if keep_leases && affected.contains(id) {
                self.check(
                    job.attempts
                        .iter()
                        .all(|a| a.outcome() != AttemptOutcome::LeaseExpired),
                    || format!("job {id} lost its lease to the outage: {:?}", job.attempts),
                );
            }
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

        // Recovery of each affected job (see the suite's doc comment for the definition).
        let busy: Vec<(String, f64, f64)> = finished
            .values()
            .flat_map(|j| j.attempts.iter())
            .filter_map(|a| {
                let from = ts_s(&a.claimed_at)?;
                let to = ts_s(&a.ended_at).unwrap_or(f64::INFINITY);
                Some((a.worker_id.clone(), from, to))
            })
            .collect();
        // True when no live worker was free to take a job at `t`.
        let all_busy = |t: f64| {
            !self.lifetimes.iter().any(|(w, (born, died))| {
                *born <= t
                    && died.is_none_or(|d| t < d)
                    && !busy
                        .iter()
                        .any(|(bw, from, to)| bw == w && *from <= t && t < *to)
            })
        };
        let mut recoveries = Vec::new();
        let mut no_progress = Vec::new();
        if let Some(t0) = fault_at {
            for id in affected {
                let Some(job) = finished.get(id) else {
                    continue;
                };
                let claim_index = job
                    .attempts
                    .iter()
                    .position(|a| ts_s(&a.claimed_at).is_some_and(|t| t > t0));
                let claim = claim_index
                    .and_then(|i| ts_s(&job.attempts[i].claimed_at))
                    .unwrap_or(f64::INFINITY);
                let point: Option<f64> = sqlx::query_scalar(
                    "SELECT extract(epoch FROM min(recorded_at))::float8 FROM metric_points
                     WHERE job_id = $1::uuid AND recorded_at > to_timestamp($2)",
                )
                .bind(id)
                .bind(progress_after.unwrap_or(t0).max(t0))
                .fetch_one(&self.pool)
                .await
                .ok()
                .flatten();
                let point = match point {
                    Some(p) if !recover_by_claim => p,
                    _ => f64::INFINITY,
                };
                if claim.is_finite() && claim <= point {
                    // Back in the queue when the interrupted attempt ended (or at the fault, if
                    // it was queued then); from there on, time when every live worker was busy
                    // with other jobs is queueing, not recovery.
                    let requeued = claim_index
                        .filter(|i| *i > 0)
                        .and_then(|i| ts_s(&job.attempts[i - 1].ended_at))
                        .map_or(t0, |e| e.max(t0));
                    let tick = 0.01;
                    let mut waited = 0.0;
                    let mut t = requeued;
                    while t < claim {
                        if all_busy(t) {
                            waited += tick;
                        }
                        t += tick;
                    }
                    recoveries.push((claim - t0 - waited).max(0.0));
                } else if point.is_finite() {
                    recoveries.push(point - t0);
                } else {
                    no_progress.push(id.clone());
                }
            }
        }
        for id in no_progress {
            self.check(false, || {
                format!("job {id} made no progress after the fault (no claim, no metric)")
            });
        }

        // Jobs that must have resumed from a stored state after a crash or a hand-back: the
        // attempt after the interrupted one resumed from the newest state stored when the fault
        // was injected (read then: the coordinator keeps only the newest few).
        for (id, outcome, newest_at_fault) in resumed {
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
            if let Some(a) = after {
                self.check(a.resumed_from_step >= *newest_at_fault, || {
                    format!(
                        "job {id}: attempt {} resumed from step {}, older than the state at step \
                         {newest_at_fault} stored before the fault",
                        a.attempt, a.resumed_from_step
                    )
                });
            }
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
        // and then stores only states past it (it did not start over from step zero). The
        // coordinator keeps only the newest few states, so "the newest stored before it" can be
        // checked here only while one of the earlier attempts' states is still listed (the
        // newest survive pruning); the scenarios that kill a worker read it at the fault.
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
                    .max();
                if let Some(newest_before) = newest_before {
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
                }
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
    let attempt = w.attempt_of(&victim).await;
    let t0 = w.kill_worker("w1");
    // An upload the worker finished just before it died may still be being recorded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let newest = w.newest_state(&victim, attempt).await;
    let affected = w.jobs_in_state("running", Some("w1")).await;
    w.start_worker("w3");
    w.notes.push(format!(
        "killed w1 holding {victim} (newest state: step {newest})"
    ));
    let affected = if affected.is_empty() {
        vec![victim.clone()]
    } else {
        affected
    };
    w.finish(Expect {
        fault_at: Some(t0),
        affected: &affected,
        recover_by_claim: true,
        resumed: &[(victim, AttemptOutcome::LeaseExpired, newest)],
        ..Expect::default()
    })
    .await
}

/// (g) Two workers with two slots each; SIGKILL of one while it trains two jobs at once, one of
/// them past a stored training state. Neither job is lost: both are reaped and resumed.
async fn slots_sigkill(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = World::new(svc, "slots-sigkill").await;
    w.submit_jobs(JOBS, EPOCHS).await;
    w.start_worker_with("w1", &["--slots", "2"]);
    w.start_worker_with("w2", &["--slots", "2"]);
    let victim = w.arm_on_resumable_job("w1").await;
    let attempt = w.attempt_of(&victim).await;
    // Both of w1's slots must be training, or this is the one-slot scenario again.
    let deadline = Instant::now() + ARM_WITHIN;
    let mut held = w.jobs_in_state("running", Some("w1")).await;
    while held.len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        held = w.jobs_in_state("running", Some("w1")).await;
    }
    let t0 = w.kill_worker("w1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let newest = w.newest_state(&victim, attempt).await;
    let affected = w.jobs_in_state("running", Some("w1")).await;
    let n = affected.len();
    w.check(n >= 2, || {
        format!("w1 held {n} running jobs when it was killed (wanted both slots busy)")
    });
    w.start_worker_with("w3", &["--slots", "2"]);
    w.notes.push(format!(
        "killed w1 holding {n} jobs, {victim} with a state at step {newest}"
    ));
    w.finish(Expect {
        fault_at: Some(t0),
        affected: &affected,
        recover_by_claim: true,
        resumed: &[(victim, AttemptOutcome::LeaseExpired, newest)],
        ..Expect::default()
    })
    .await
}

/// (b) FLUSHALL on Redis, then the server is killed and started again, empty, on its port,
/// while jobs are queued (their ids are lost) and running.
async fn redis_flushall(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "redis-flushall").await;
    w.wait_running(2, 4).await;
    let queued = w.jobs_in_state("queued", None).await;
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
        recover_by_claim: true,
        min_workers: 2,
        ..Expect::default()
    })
    .await
}

/// (c) SIGKILL of the coordinator while workers train; started again on the same port.
async fn coordinator_restart(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "coordinator-restart").await;
    w.wait_running(2, 8).await;
    let running = w.jobs_in_state("running", None).await;
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
        keep_leases: true,
        min_workers: 2,
        ..Expect::default()
    })
    .await
}

/// How long the postgres-restart scenario keeps Postgres down.
const OUTAGE_S: u64 = 7;

/// (d) Postgres stopped (fast) for [`OUTAGE_S`] s and started again while workers train and a
/// client keeps submitting. The outage is longer than the coordinator's database acquire timeout
/// (3 s) and the lease timeout (3 s): submissions must be refused with UNAVAILABLE (and nothing else) while it
/// lasts, every acknowledged job must exist, and running jobs must keep their leases (the reaper
/// waits for the workers' heartbeats after the outage).
async fn postgres_restart(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "postgres-restart").await;
    w.wait_running(2, 8).await;

    // A client that keeps submitting (short jobs, 1 epoch) through the outage.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut client = w.client.clone();
    let submitter = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut refusals = Vec::new();
        let mut errors = Vec::new();
        let mut slowest = Duration::ZERO;
        let mut i = 100;
        while !*stop_rx.borrow() {
            i += 1;
            let spec = chaos_spec("postgres-restart", i, 1);
            let sent = Instant::now();
            match submit_retrying(&mut client, spec, Duration::from_secs(60), &mut refusals).await {
                Ok(id) => acked.push((id, 1u64)),
                Err(e) => errors.push(format!("{e:#}")),
            }
            slowest = slowest.max(sent.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop_rx.changed() => {}
            }
        }
        (acked, refusals, errors, slowest)
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let running = w.jobs_in_state("running", None).await;
    let t0 = now_s();
    tokio::task::block_in_place(|| svc.pg.stop())
        .unwrap_or_else(|e| panic!("stopping the private Postgres: {e:#}\n{}", svc.pg.log()));
    // Points stored while `pg_ctl stop` was closing connections predate the outage.
    let stopped = now_s();
    // Long enough that a refusal is certain whatever the submitter's phase: a submission caught
    // in flight by the stop may hold the client for the whole acquire timeout (3 s, in its
    // post-commit dispatch record) and then sleep 0.5 s; the next one starts at most 3.5 s into
    // the outage and must be refused 3 s later, before Postgres returns. (With 5 s this check
    // depended on where the stop fell in the submitter's 500 ms rhythm, which TCP_NODELAY's
    // faster calls moved onto the stop itself.)
    tokio::time::sleep(Duration::from_secs(OUTAGE_S)).await;
    tokio::task::block_in_place(|| svc.pg.start()).unwrap_or_else(|e| {
        panic!(
            "starting the private Postgres again: {e:#}\n{}",
            svc.pg.log()
        )
    });
    let down = now_s() - t0;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop_tx.send(true);
    let (acked, refusals, errors, slowest) = submitter.await.expect("submitter task");
    let unavailable = refusals
        .iter()
        .filter(|c| **c == tonic::Code::Unavailable)
        .count();
    let other: Vec<&tonic::Code> = refusals
        .iter()
        .filter(|c| **c != tonic::Code::Unavailable)
        .collect();
    w.notes.push(format!(
        "Postgres down {down:.1} s; {} submitted by a client meanwhile, {unavailable} UNAVAILABLE \
         refusals retried, slowest acknowledgement {:.1} s",
        acked.len(),
        slowest.as_secs_f64()
    ));
    w.check(errors.is_empty(), || {
        format!("submissions never acknowledged: {errors:?}")
    });
    w.check(unavailable >= 1, || {
        format!("no submission was refused with UNAVAILABLE during a {OUTAGE_S} s Postgres outage")
    });
    w.check(other.is_empty(), || {
        format!("submissions during the Postgres outage were refused with codes other than UNAVAILABLE: {other:?}")
    });
    w.jobs.extend(acked);
    w.finish(Expect {
        fault_at: Some(t0),
        affected: &running,
        keep_leases: true,
        progress_after: Some(stopped),
        min_workers: 2,
        ..Expect::default()
    })
    .await
}

/// (e) Two workers race for the same jobs: every id is also added to three more queues that
/// both workers serve (a queue holds an id once), and both workers start at once. No fault;
/// each job must run exactly once.
async fn worker_race(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = World::new(svc, "worker-race").await;
    w.submit_jobs(JOBS, EPOCHS).await;
    let keys = proto::queue::Keys::new(w.env.redis_prefix.clone());
    let extra = ["race-1", "race-2", "race-3"];
    {
        let mut conn = svc.redis.connection().expect("redis connection");
        for (id, _) in &w.jobs {
            for queue in extra {
                let _: i64 = redis::cmd("ZADD")
                    .arg(keys.ready(queue))
                    .arg(0)
                    .arg(id)
                    .query(&mut conn)
                    .expect("ZADD duplicate id");
            }
        }
    }
    let queues = format!("{},{}", proto::queue::DEFAULT_QUEUE, extra.join(","));
    w.start_worker_with("w1", &["--queues", &queues]);
    w.start_worker_with("w2", &["--queues", &queues]);
    w.notes
        .push(format!("every id pushed 4 times ({} ids)", 4 * JOBS));
    // Both workers must have taken part, or there was no race.
    let (mut row, mut failures) = w
        .finish(Expect {
            single_attempt: true,
            min_workers: 2,
            ..Expect::default()
        })
        .await;
    // Every duplicate is popped by an idle worker and its claim refused: the sets drain.
    let mut conn = svc.redis.connection().expect("redis connection");
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        let mut left = 0;
        for queue in extra {
            let n: i64 = redis::cmd("ZCARD")
                .arg(keys.ready(queue))
                .query(&mut conn)
                .expect("ZCARD");
            left += n;
        }
        if left == 0 || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if left == 0 {
        row.notes
            .push_str("; every duplicate popped and its claim refused");
    } else {
        failures.push(format!(
            "{left} duplicate ids still queued in Redis 10 s after every job ended"
        ));
    }
    (row, failures)
}

/// (f) SIGTERM of a worker mid-training: it stops at a step boundary and hands its job back,
/// which does not count as a failure and resumes on another worker.
async fn worker_sigterm(svc: &mut Services) -> (Row, Vec<String>) {
    let mut w = two_workers_with_jobs(svc, "worker-sigterm").await;
    let victim = w.arm_on_resumable_job("w1").await;
    let attempt = w.attempt_of(&victim).await;
    let t0 = now_s();
    let mut p = w.workers.remove("w1").expect("w1 runs");
    let exit = tokio::task::block_in_place(|| p.terminate(Duration::from_secs(30)));
    let exited_after = now_s() - t0;
    w.died("w1", t0 + exited_after);
    let newest = w.newest_state(&victim, attempt).await;
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
        recover_by_claim: true,
        resumed: &[(victim.clone(), AttemptOutcome::HandedBack, newest)],
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

/// The suite. Mean time to recover (MTTR), per scenario: the mean, over the jobs the fault hit,
/// of each job's time to recover. The jobs the fault hit: the job the killed or terminated
/// worker held; the jobs queued when Redis was flushed (their ids were lost); the jobs running
/// when the coordinator or Postgres went down. A job's time to recover runs from the fault's
/// injection to its first sign of progress after it: a claim (`Attempt.claimed_at`) or, for
/// the jobs whose worker lived on (coordinator and Postgres restarts), a stored metric point
/// (`metric_points.recorded_at`), whichever comes first. When that is a claim,
/// the time after the job was back in the queue (its interrupted attempt ended, or the fault, for
/// a job that was queued) during which every live worker was busy with other jobs is left out:
/// that is queueing, which a fault-free run has too, not recovery. So it counts the service's
/// downtime, the lease timeout (3 s) where a lease must expire, and the re-dispatch of lost ids
/// (a free worker's wait for them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The lock is held for the whole test on purpose: it keeps other training tests of this binary
// from running during the suite; nothing else in the test takes it.
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
        ("slots-sigkill", |s| Box::pin(slots_sigkill(s))),
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
        let (started, wall_started) = (Instant::now(), now_s());
        let (row, failed) = run(&mut svc).await;
        // Leases are measured on the database's clock; a step of the wall clock during a
        // scenario (NTP on a fresh VM) explains odd timestamps in its failures.
        let stepped = (now_s() - wall_started) - started.elapsed().as_secs_f64();
        eprintln!(
            "[chaos] scenario {name}: {} of {} jobs completed, {} failed checks, {:.0} s{}",
            row.completed,
            row.jobs,
            failed.len(),
            started.elapsed().as_secs_f64(),
            if stepped.abs() > 1.0 {
                format!(" (the wall clock stepped {stepped:+.1} s meanwhile)")
            } else {
                String::new()
            }
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
