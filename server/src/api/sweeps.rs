//! The sweep RPCs of `trainq.v1.JobService`: submit, inspect, list, cancel and watch sweeps,
//! and summarise their results over random seeds.
//!
//! A sweep's jobs are ordinary jobs: SubmitSweep stores them (with the sweep's rows) in one
//! transaction and dispatches those that start queued, CancelSweep cancels each unfinished one
//! the way CancelJob does, and WatchSweep follows their state changes through the job notifier.
//! A sweep's state is derived from its jobs' states every time it is read. No answer carries
//! more than one page of runs (GetSweep pages through them; SubmitSweep and CancelSweep answer
//! with the first page; ListSweeps and WatchSweep with none).

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
use crate::domain::{
    self, query::page_size, PageToken, RequestKey, RequestKind, RunPage, RunPageToken, SweepQuery,
};
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
/// Answers with the sweep and the first page of its runs. With a request_id that an earlier
/// submit used for the same spec, that sweep is the answer and nothing is stored or pushed.
pub async fn submit(state: &AppState, req: v1::SubmitSweepRequest) -> Result<v1::Sweep> {
    let spec = req
        .spec
        .ok_or_else(|| Error::invalid("spec", "is required"))?;
    let plan = SweepPlan::try_from(spec)?;
    let key = RequestKey::parse(
        RequestKind::Sweep,
        "request_id",
        &req.request_id,
        &plan.to_json(),
    )?;
    let id = SweepId::from(Uuid::now_v7());
    let inserted = store::insert_sweep(&state.pool, id, &plan, key.as_ref()).await?;
    if inserted.new {
        tracing::info!(
            sweep_id = %id, name = %plan.name, arms = plan.arms.len(), seeds = plan.seeds.len(),
            jobs = inserted.jobs, queued = inserted.queued.len(), "sweep submitted"
        );
        dispatch_now(state, &inserted.queued).await;
    } else {
        tracing::info!(
            sweep_id = %inserted.id, request_id = %req.request_id,
            "sweep submitted again with the same request id; answered with the first"
        );
    }
    load(state, inserted.id, RunPage::FIRST).await
}

pub async fn get(state: &AppState, req: v1::GetSweepRequest) -> Result<v1::Sweep> {
    let query = SweepQuery::try_from(req)?;
    load(state, query.id, query.runs).await
}

/// The sweep with its arms, counts and one page of its runs, from one snapshot (NOT_FOUND if
/// there is none).
async fn load(state: &AppState, id: SweepId, page: RunPage) -> Result<v1::Sweep> {
    let snapshot = store::sweep_snapshot(&state.pool, id, page)
        .await?
        .ok_or_else(|| Error::sweep_not_found(id))?;
    let mut sweep = sweep_to_proto(snapshot.row, &snapshot.counts)?;
    sweep.arms = snapshot.arms.into_iter().map(|a| a.name).collect();
    sweep.runs = snapshot.runs.iter().map(run_to_proto).collect();
    sweep.next_page_token = snapshot
        .next
        .map(|position| RunPageToken { position }.encode())
        .unwrap_or_default();
    Ok(sweep)
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

/// The state a sweep is in, given whether it was cancelled and how many of its jobs are in
/// each state.
fn sweep_state(cancelled: bool, counts: &[(JobState, i64)]) -> SweepState {
    let present = counts.iter().filter(|(_, n)| *n > 0).map(|(s, _)| *s);
    SweepState::derive(cancelled, present)
}

/// The wire counts, in JobState order, so the list reads the same every time.
fn jobs_by_state(counts: &[(JobState, i64)]) -> Vec<v1::StateCount> {
    let mut jobs_by_state: Vec<v1::StateCount> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| v1::StateCount {
            state: v1::JobState::from(*s) as i32,
            count: (*n).clamp(0, i64::from(u32::MAX)) as u32,
        })
        .collect();
    jobs_by_state.sort_by_key(|c| c.state);
    jobs_by_state
}

/// A sweep without its arms and runs.
fn sweep_to_proto(row: SweepRow, counts: &[(JobState, i64)]) -> Result<v1::Sweep> {
    let spec: v1::SweepSpec = serde_json::from_value(row.spec.clone()).map_err(|e| {
        Error::Internal(anyhow::anyhow!(
            "sweep {} has an unreadable spec: {e}",
            row.id
        ))
    })?;
    let state = sweep_state(row.cancelled_at.is_some(), counts);
    Ok(v1::Sweep {
        sweep_id: row.id.to_string(),
        spec: Some(spec),
        state: v1::SweepState::from(state) as i32,
        arms: Vec::new(),
        runs: Vec::new(),
        jobs_by_state: jobs_by_state(counts),
        created_at: Some(timestamp(row.created_at)),
        next_page_token: String::new(),
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

/// Records the cancellation and cancels every unfinished job, arms before sources (so arm
/// runs end `cancelled`, not `failed` because their source was cancelled), in one transaction;
/// a job that ended on its own meanwhile keeps its result. Answers like SubmitSweep (the first
/// page of runs).
pub async fn cancel(state: &AppState, req: v1::CancelSweepRequest) -> Result<v1::Sweep> {
    let id = domain::parse_sweep_id("sweep_id", &req.sweep_id)?;
    let reason = domain::reason_text(&req.reason, "sweep cancelled by user");
    let done = store::cancel_sweep(&state.pool, id, &reason)
        .await?
        .ok_or_else(|| Error::sweep_not_found(id))?;
    let cancelled = done.cancelled.len();
    tracing::info!(sweep_id = %id, jobs = cancelled, %reason, "sweep cancelled");
    load(state, id, RunPage::FIRST).await
}

/// Sends the sweep now, then again whenever its state or its job counts changed, until every
/// job has ended (that message is the last), the client leaves, or the coordinator shuts down.
///
/// Cheap for a big sweep: the stream wakes only on its jobs' state changes (metric points do
/// not wake it, see [`crate::events`]) and on the fallback poll, and each look reads only the
/// counts ([`store::sweep_progress`], one aggregate statement), never the runs; the spec and
/// arms are read once, for the first message, and reused.
pub async fn watch(state: Arc<AppState>, req: v1::WatchSweepRequest) -> Result<SweepEvents> {
    let id = domain::parse_sweep_id("sweep_id", &req.sweep_id)?;
    // The job ids never change after submission; subscribe before the first read.
    let subscriptions: Vec<_> = store::sweep_job_ids(&state.pool, id)
        .await?
        .iter()
        .map(|job| state.notifier.subscribe_states(job.as_uuid()))
        .collect();
    let snapshot = store::sweep_snapshot(
        &state.pool,
        id,
        RunPage {
            size: 0,
            after: None,
        },
    )
    .await?
    .ok_or_else(|| Error::sweep_not_found(id))?;
    let mut header = sweep_to_proto(snapshot.row, &snapshot.counts)?;
    header.arms = snapshot.arms.into_iter().map(|a| a.name).collect();
    let (tx, rx) = mpsc::channel(follow::STREAM_BUFFER);
    let ended = all_ended(&snapshot.counts);
    let seen = (header.state, header.jobs_by_state.clone());
    if tx.send(Ok(header.clone())).await.is_ok() && !ended {
        let context = state.follow_context();
        let watcher = SweepWatcher {
            state,
            id,
            header,
            seen,
        };
        follow::spawn(watcher, subscriptions, context, tx);
    }
    Ok(ReceiverStream::new(rx))
}

/// Every job has ended (a sweep always has jobs).
fn all_ended(counts: &[(JobState, i64)]) -> bool {
    counts.iter().all(|(s, n)| *n == 0 || s.is_terminal())
}

/// One WatchSweep stream's reading side: sends the sweep when its state or counts changed.
struct SweepWatcher {
    state: Arc<AppState>,
    id: SweepId,
    /// The first message: spec, arms and created_at never change; state and counts are set
    /// from each look.
    header: v1::Sweep,
    /// The state and counts last sent.
    seen: (i32, Vec<v1::StateCount>),
}

impl Watcher for SweepWatcher {
    type Event = v1::Sweep;

    async fn look(&mut self, tx: &Sender<v1::Sweep>) -> Result<Step> {
        let progress = store::sweep_progress(&self.state.pool, self.id)
            .await?
            .ok_or_else(|| Error::sweep_not_found(self.id))?;
        let now = (
            v1::SweepState::from(sweep_state(progress.cancelled, &progress.counts)) as i32,
            jobs_by_state(&progress.counts),
        );
        if now == self.seen {
            return Ok(Step::Continue);
        }
        self.seen = now.clone();
        let mut sweep = self.header.clone();
        (sweep.state, sweep.jobs_by_state) = now;
        let ended = all_ended(&progress.counts);
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
