//! The sweep RPCs of `trainq.v1.JobService`: submit, inspect, list, cancel and watch sweeps,
//! and summarise their results over random seeds.
//!
//! A sweep's jobs are ordinary jobs: SubmitSweep stores them (with the sweep's rows) in one
//! transaction and dispatches those that start queued, CancelSweep cancels each unfinished one
//! the way CancelJob does, and WatchSweep follows them through the job notifier. A sweep's
//! state is derived from its jobs' states every time it is read.

use std::collections::HashSet;
use std::sync::Arc;

use proto::sweep::SweepPlan;
use proto::{metric, v1, JobState, MetricName, SweepId, SweepState};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uuid::Uuid;

use super::follow::{self, Sender, Step, Watcher};
use super::{dispatch_now, timestamp, AppState};
use crate::domain::{self, query::page_size, PageToken};
use crate::error::{Error, Result};
use crate::store::{self, SweepRow, SweepRunRow};
use crate::summary::{summarise, SummaryRequest};

/// The stream type WatchSweep returns.
pub type SweepEvents = ReceiverStream<Result<v1::Sweep, Status>>;

/// Most metrics one GetSweepSummary call may name.
const MAX_SUMMARY_METRICS: usize = 64;
/// What GetSweepSummary summarises when the request names no metrics.
const CVAE_METRICS: [&str; 4] = [
    metric::TEST_NEG_ELBO_NATS,
    metric::TEST_BITS_PER_DIM,
    metric::TEST_RECON,
    metric::TEST_KL,
];
const CLASSIFIER_METRICS: [&str; 2] = [metric::TEST_LOSS, metric::TEST_ACCURACY];

/// Stores the sweep and its jobs (all or nothing), then dispatches the jobs that start queued.
pub async fn submit(state: &AppState, req: v1::SubmitSweepRequest) -> Result<v1::Sweep> {
    let spec = req
        .spec
        .ok_or_else(|| Error::invalid("spec", "is required"))?;
    let plan = SweepPlan::try_from(spec)?;
    let id = SweepId::from(Uuid::now_v7());
    let inserted = store::insert_sweep(&state.pool, id, &plan).await?;
    tracing::info!(
        sweep_id = %id, name = %plan.name, arms = plan.arms.len(), seeds = plan.seeds.len(),
        jobs = inserted.jobs, queued = inserted.queued.len(), "sweep submitted"
    );
    dispatch_now(state, &inserted.queued).await;
    load(state, id).await
}

pub async fn get(state: &AppState, req: v1::GetSweepRequest) -> Result<v1::Sweep> {
    let id = domain::parse_sweep_id("sweep_id", &req.sweep_id)?;
    load(state, id).await
}

/// The sweep with its arms, runs and counts, from one snapshot (NOT_FOUND if there is none).
async fn load(state: &AppState, id: SweepId) -> Result<v1::Sweep> {
    let (row, arms, runs) = store::sweep_snapshot(&state.pool, id)
        .await?
        .ok_or_else(|| Error::sweep_not_found(id))?;
    let counts = count(runs.iter().map(|r| r.state));
    let mut sweep = sweep_to_proto(row, &counts)?;
    sweep.arms = arms.into_iter().map(|a| a.name).collect();
    sweep.runs = runs.iter().map(run_to_proto).collect();
    Ok(sweep)
}

fn count(states: impl Iterator<Item = JobState>) -> Vec<(JobState, i64)> {
    let mut counts: Vec<(JobState, i64)> = Vec::new();
    for s in states {
        match counts.iter_mut().find(|(k, _)| *k == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    counts
}

fn run_to_proto(r: &SweepRunRow) -> v1::SweepRun {
    v1::SweepRun {
        job_id: r.job_id.to_string(),
        arm: r.arm.clone(),
        seed: r.seed,
        source: r.is_source,
        state: v1::JobState::from(r.state) as i32,
    }
}

/// The state a sweep is in, given how many of its jobs are in each state.
fn sweep_state(row: &SweepRow, counts: &[(JobState, i64)]) -> SweepState {
    let present = counts.iter().filter(|(_, n)| *n > 0).map(|(s, _)| *s);
    SweepState::derive(row.cancelled_at.is_some(), present)
}

/// A sweep without its arms and runs.
fn sweep_to_proto(row: SweepRow, counts: &[(JobState, i64)]) -> Result<v1::Sweep> {
    let spec: v1::SweepSpec = serde_json::from_value(row.spec.clone()).map_err(|e| {
        Error::Internal(anyhow::anyhow!(
            "sweep {} has an unreadable spec: {e}",
            row.id
        ))
    })?;
    let state = sweep_state(&row, counts);
    // In JobState order, so the list reads the same every time.
    let mut jobs_by_state: Vec<v1::StateCount> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| v1::StateCount {
            state: v1::JobState::from(*s) as i32,
            count: (*n).clamp(0, i64::from(u32::MAX)) as u32,
        })
        .collect();
    jobs_by_state.sort_by_key(|c| c.state);
    Ok(v1::Sweep {
        sweep_id: row.id.to_string(),
        spec: Some(spec),
        state: v1::SweepState::from(state) as i32,
        arms: Vec::new(),
        runs: Vec::new(),
        jobs_by_state,
        created_at: Some(timestamp(row.created_at)),
    })
}

pub async fn list(state: &AppState, req: v1::ListSweepsRequest) -> Result<v1::ListSweepsResponse> {
    let page_size = page_size(req.page_size);
    let after = match req.page_token.as_str() {
        "" => None,
        token => Some(PageToken::decode(token).map_err(|_| {
            Error::invalid(
                "page_token",
                "is not a token from a previous ListSweeps response",
            )
        })?),
    };
    let (rows, next) = store::list_sweeps(&state.pool, page_size, after).await?;
    let ids: Vec<SweepId> = rows.iter().map(|r| r.id).collect();
    let mut counts = store::sweep_state_counts(&state.pool, &ids).await?;
    let sweeps = rows
        .into_iter()
        .map(|row| {
            let c = counts.remove(&row.id).unwrap_or_default();
            sweep_to_proto(row, &c)
        })
        .collect::<Result<_>>()?;
    Ok(v1::ListSweepsResponse {
        sweeps,
        next_page_token: next.map(|t| t.encode()).unwrap_or_default(),
    })
}

/// Records the cancellation, then cancels every unfinished job, arms before sources (so arm
/// runs end `cancelled`, not `failed` because their source was cancelled). Each job is
/// cancelled in its own transaction by the CancelJob store logic; a job that ends on its own
/// meanwhile keeps its result.
pub async fn cancel(state: &AppState, req: v1::CancelSweepRequest) -> Result<v1::Sweep> {
    let id = domain::parse_sweep_id("sweep_id", &req.sweep_id)?;
    let reason = domain::reason_text(&req.reason, "sweep cancelled by user");
    let done = store::cancel_sweep(&state.pool, id, &reason)
        .await?
        .ok_or_else(|| Error::sweep_not_found(id))?;
    for job in done.cancelled.iter().chain(&done.dependents_failed) {
        state.notifier.notify(job.as_uuid());
    }
    let cancelled = done.cancelled.len();
    tracing::info!(sweep_id = %id, jobs = cancelled, %reason, "sweep cancelled");
    load(state, id).await
}

/// Sends the sweep now, then after every change of one of its jobs' states, until every job
/// has ended (that message is the last), the client leaves, or the coordinator shuts down.
pub async fn watch(state: Arc<AppState>, req: v1::WatchSweepRequest) -> Result<SweepEvents> {
    let id = domain::parse_sweep_id("sweep_id", &req.sweep_id)?;
    // The job ids never change after submission; subscribe before the first read.
    let runs = store::sweep_runs(&state.pool, id).await?;
    let subscriptions: Vec<_> = runs
        .iter()
        .map(|r| state.notifier.subscribe(r.job_id.as_uuid()))
        .collect();
    let sweep = load(&state, id).await?;
    let (tx, rx) = mpsc::channel(follow::STREAM_BUFFER);
    let ended = all_ended(&sweep);
    let seen = fingerprint(&sweep);
    if tx.send(Ok(sweep)).await.is_ok() && !ended {
        let shutdown = state.shutdown.clone();
        let watcher = SweepWatcher { state, id, seen };
        follow::spawn(watcher, subscriptions, shutdown, tx);
    }
    Ok(ReceiverStream::new(rx))
}

fn all_ended(sweep: &v1::Sweep) -> bool {
    sweep
        .runs
        .iter()
        .all(|r| v1::JobState::try_from(r.state).is_ok_and(|s| s.is_terminal()))
}

/// What a watcher compares: the sweep's state and every run's state.
fn fingerprint(sweep: &v1::Sweep) -> (i32, Vec<i32>) {
    (sweep.state, sweep.runs.iter().map(|r| r.state).collect())
}

/// One WatchSweep stream's reading side: sends the sweep when its fingerprint changed.
struct SweepWatcher {
    state: Arc<AppState>,
    id: SweepId,
    seen: (i32, Vec<i32>),
}

impl Watcher for SweepWatcher {
    type Event = v1::Sweep;

    async fn look(&mut self, tx: &Sender<v1::Sweep>) -> Result<Step> {
        let sweep = load(&self.state, self.id).await?;
        let now = fingerprint(&sweep);
        if now == self.seen {
            return Ok(Step::Continue);
        }
        self.seen = now;
        let ended = all_ended(&sweep);
        if tx.send(Ok(sweep)).await.is_err() || ended {
            return Ok(Step::Done);
        }
        Ok(Step::Continue)
    }
}

fn check_metric(field: &str, name: &str) -> Result<()> {
    MetricName::parse(field, name)?;
    Ok(())
}

pub async fn summary(
    state: &AppState,
    req: v1::GetSweepSummaryRequest,
) -> Result<v1::SweepSummary> {
    let id = domain::parse_sweep_id("sweep_id", &req.sweep_id)?;
    if req.metrics.len() > MAX_SUMMARY_METRICS {
        return Err(Error::invalid(
            "metrics",
            format!(
                "at most {MAX_SUMMARY_METRICS} metrics, got {}",
                req.metrics.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for (i, m) in req.metrics.iter().enumerate() {
        check_metric(&format!("metrics[{i}]"), m)?;
        if !seen.insert(m.as_str()) {
            return Err(Error::invalid(
                format!("metrics[{i}]"),
                format!("{m} is listed twice"),
            ));
        }
    }
    if !req.convergence_metric.is_empty() {
        check_metric("convergence_metric", &req.convergence_metric)?;
    }
    let row = store::get_sweep(&state.pool, id)
        .await?
        .ok_or_else(|| Error::sweep_not_found(id))?;
    let cvae = row.kind == "cifar_cvae";
    let metrics: Vec<String> = if req.metrics.is_empty() {
        let defaults: &[&str] = if cvae {
            &CVAE_METRICS
        } else {
            &CLASSIFIER_METRICS
        };
        defaults.iter().map(|s| (*s).to_owned()).collect()
    } else {
        req.metrics.clone()
    };
    let convergence_metric = match req.convergence_metric.as_str() {
        "" if cvae => metric::TEST_NEG_ELBO_NATS.to_owned(),
        "" => metric::TEST_LOSS.to_owned(),
        m => m.to_owned(),
    };
    let arms = store::sweep_arms(&state.pool, id).await?;
    let baseline = if req.baseline_arm.is_empty() {
        let random: Vec<&str> = arms
            .iter()
            .filter(|a| a.baseline)
            .map(|a| a.name.as_str())
            .collect();
        match random.as_slice() {
            [one] => (*one).to_owned(),
            others => {
                return Err(Error::FailedPrecondition(format!(
                    "sweep {id} has {} arms with random initialisation ({}); name the baseline with baseline_arm",
                    others.len(),
                    others.join(", ")
                )))
            }
        }
    } else if arms.iter().any(|a| a.name == req.baseline_arm) {
        req.baseline_arm.clone()
    } else {
        return Err(Error::invalid(
            "baseline_arm",
            format!("sweep {id} has no arm named {:?}", req.baseline_arm),
        ));
    };
    let runs = store::sweep_runs(&state.pool, id).await?;
    let mut names = metrics.clone();
    if !names.contains(&convergence_metric) {
        names.push(convergence_metric.clone());
    }
    // Only the epoch ends: all that the summary's definitions use.
    let points = store::sweep_epoch_end_points(&state.pool, id, &names).await?;
    Ok(summarise(
        id,
        &arms,
        &runs,
        &points,
        &SummaryRequest {
            metrics: &metrics,
            baseline: &baseline,
            convergence_metric: &convergence_metric,
        },
    ))
}
