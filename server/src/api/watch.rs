//! WatchJob: a server stream of one job's state changes and new metric points.
//!
//! The stream sends the job as it is now, then, whenever the notifier pokes it or the fallback
//! poll fires (the loop in [`super::follow`]), the metric points stored since its cursor
//! (`metric_points.seq`) and the job again if its state or attempt changed. It ends after the
//! event that shows a terminal state, when the client goes away, or (with UNAVAILABLE) when the
//! coordinator shuts down.
//!
//! Must not write anything, and must not send a Job event after the one that shows a terminal
//! state.

use std::sync::Arc;

use proto::v1::{self, job_event::Event};
use proto::JobId;
use sqlx::PgConnection;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::follow::{self, Sender, Step, Watcher};
use super::{job_of_row, load_job, state_of, AppState};
use crate::error::{Error, Result};
use crate::store;

/// The stream type WatchJob returns.
pub type JobEvents = ReceiverStream<Result<v1::JobEvent, Status>>;

/// Most points in one MetricBatch event.
const BATCH_POINTS: i64 = 1000;

/// Where a watcher is: what it last told the client.
struct Cursor {
    /// Highest `metric_points.seq` already sent (or already in the past when watching began).
    seq: i64,
    /// (state, attempt) of the last Job event.
    seen: (i32, u32),
}

/// Most points before the newest a watcher given a cursor catches up on: a page that was
/// rendered long ago (or a made-up cursor) reads no more than this much history.
const MAX_CATCH_UP_POINTS: i64 = 10_000;

/// Reads the job (NOT_FOUND before any stream exists), then streams from a task of its own.
/// Points stored after `after` (a `metric_points.seq` the caller has already seen, no further
/// back than [`MAX_CATCH_UP_POINTS`]) come first; without it, only points stored from now on.
pub async fn start(state: Arc<AppState>, id: JobId, after: Option<i64>) -> Result<JobEvents> {
    // Subscribe before the first read, so a change between the read and the loop is not lost.
    let subscription = state.notifier.subscribe(id.as_uuid());
    let last = store::last_metric_seq(&state.pool, id).await?;
    let seq = match after {
        Some(after) => after.clamp(last.saturating_sub(MAX_CATCH_UP_POINTS), last),
        None => last,
    };
    let job = load_job(&state, id).await?;
    let (tx, rx) = mpsc::channel(follow::STREAM_BUFFER);
    let cursor = Cursor {
        seq,
        seen: (job.state, job.attempt),
    };
    let ended = job_is_terminal(&job);
    if tx.send(Ok(job_event(job))).await.is_ok() && !ended {
        let context = state.follow_context();
        let watcher = JobWatcher { state, id, cursor };
        follow::spawn(watcher, vec![subscription], context, tx);
    }
    Ok(ReceiverStream::new(rx))
}

fn job_event(job: v1::Job) -> v1::JobEvent {
    v1::JobEvent {
        event: Some(Event::Job(job)),
    }
}

fn job_is_terminal(job: &v1::Job) -> bool {
    v1::JobState::try_from(job.state).is_ok_and(|s| s.is_terminal())
}

/// One WatchJob stream's reading side.
struct JobWatcher {
    state: Arc<AppState>,
    id: JobId,
    cursor: Cursor,
}

impl Watcher for JobWatcher {
    type Event = v1::JobEvent;

    async fn look(&mut self, tx: &Sender<v1::JobEvent>) -> Result<Step> {
        catch_up(&self.state, self.id, &mut self.cursor, tx).await
    }
}

/// Sends what changed since the cursor. The job's row is read before the points: a job seen in
/// a terminal state can get no more points (worker writes need a running lease), so the points
/// read afterwards are complete and the terminal Job event can safely be the last. The Job
/// event shows that row (with its attempts and latest metrics), and only when its state or
/// attempt moved, so a look woken by new points costs two small queries. A change after the
/// row was read has woken the watcher again, and the next look sends it.
async fn catch_up(
    state: &AppState,
    id: JobId,
    cursor: &mut Cursor,
    tx: &Sender<v1::JobEvent>,
) -> Result<Step> {
    // One pooled connection for the whole look (the read slot that `follow` holds bounds
    // how many looks hold one), rather than a pool check-out per query.
    let mut conn = state.pool.acquire().await?;
    let row = store::get_job(&mut *conn, id)
        .await?
        .ok_or_else(|| Error::job_not_found(id))?;
    let now = (state_of(&row) as i32, row.attempt.max(0) as u32);
    if send_points(&mut conn, id, cursor, tx).await? == Step::Done {
        return Ok(Step::Done);
    }
    if now == cursor.seen {
        return Ok(Step::Continue);
    }
    let job = job_of_row(&mut conn, state.lease_timeout, id, row).await?;
    cursor.seen = now;
    let ended = job_is_terminal(&job);
    if tx.send(Ok(job_event(job))).await.is_err() || ended {
        return Ok(Step::Done);
    }
    Ok(Step::Continue)
}

/// Sends the points stored after the cursor, in batches; `Done` when the client left.
async fn send_points(
    conn: &mut PgConnection,
    id: JobId,
    cursor: &mut Cursor,
    tx: &Sender<v1::JobEvent>,
) -> Result<Step> {
    loop {
        let points = store::metrics_after(&mut *conn, id, cursor.seq, BATCH_POINTS).await?;
        let Some((last_seq, _)) = points.last() else {
            return Ok(Step::Continue);
        };
        cursor.seq = *last_seq;
        let full = points.len() as i64 == BATCH_POINTS;
        let batch = v1::MetricBatch {
            points: points.into_iter().map(|(_, p)| p.into()).collect(),
        };
        if tx
            .send(Ok(v1::JobEvent {
                event: Some(Event::Metrics(batch)),
            }))
            .await
            .is_err()
        {
            return Ok(Step::Done);
        }
        if !full {
            return Ok(Step::Continue);
        }
    }
}
