//! `/runs/{id}/events?after=SEQ`: a run's new metric points and state changes as server-sent
//! events, from the WatchJob loop (the same admission limits, the same end at a terminal state
//! or at shutdown). `after` is the point cursor the page was rendered at, so no point stored
//! between the page and the stream is lost.
//!
//! Events: `job` (`{"state": "running", "attempt": 1, "terminal": false}`) and `points` (an
//! array of `{"name", "step", "epoch", "value"}`, a non-finite value as null), and `end` (the
//! watch was refused or failed for good: the page stops listening). When this coordinator
//! shuts down (UNAVAILABLE) the stream just ends, with no `end`, so the browser's EventSource
//! connects again by itself, through a balancer to another replica, from the same cursor (the
//! page skips points it already has).

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt as _};
use proto::v1::{self, job_event};
use serde::Deserialize;
use serde_json::json;

use super::{Web, WebError};
use crate::domain::parse_job_id;

/// How soon a browser opens a stream again after it broke (the SSE `retry` field).
const RECONNECT_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Default, Deserialize)]
pub struct EventsQuery {
    after: Option<i64>,
}

pub async fn events(
    State(web): State<Web>,
    Path(id): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, WebError> {
    let Query(q) = q.map_err(|e| WebError::bad_request(e.body_text()))?;
    let id = parse_job_id("job_id", &id).map_err(tonic::Status::from)?;
    let stream = web.api.watch_after(id, q.after).await?;
    let events = stream
        .take_while(|item| {
            let unavailable = matches!(item, Err(s) if s.code() == tonic::Code::Unavailable);
            std::future::ready(!unavailable)
        })
        .map(|item| {
        Ok(match item {
            Ok(v1::JobEvent {
                event: Some(job_event::Event::Job(job)),
            }) => Event::default().event("job").data(
                json!({
                    "state": proto::state_name(job.state()),
                    "attempt": job.attempt,
                    "terminal": job.state().is_terminal(),
                })
                .to_string(),
            ),
            Ok(v1::JobEvent {
                event: Some(job_event::Event::Metrics(batch)),
            }) => Event::default().event("points").data(
                serde_json::Value::Array(
                    batch
                        .points
                        .iter()
                        .map(|p| {
                            json!({"name": p.name, "step": p.step, "epoch": p.epoch, "value": p.value})
                        })
                        .collect(),
                )
                .to_string(),
            ),
            Ok(v1::JobEvent { event: None }) => Event::default().comment("empty"),
            Err(status) => Event::default()
                .event("end")
                .data(status.message()),
        })
    });
    // Reconnect a second after a broken stream (the default is three).
    let events = futures::stream::once(std::future::ready(Ok(
        Event::default().retry(RECONNECT_AFTER)
    )))
    .chain(events);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
