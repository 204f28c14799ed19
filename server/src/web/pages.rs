//! The page handlers: parse the query (400 with a message when malformed), call the JobService
//! handlers, render.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use futures::StreamExt as _;
use proto::v1::{self, job_service_server::JobService as _};
use serde::Deserialize;

use super::session::{check_csrf, CsrfForm, Session};
use super::{views, Web, WebError};
use crate::domain::parse_job_id;
use crate::store;

/// Runs per page of the runs table: the default, and the cap on `size`.
const RUNS_PAGE: u32 = 50;
const MAX_RUNS_PAGE: u32 = 200;
/// Points per series on a run page and in a comparison: enough for a chart as wide as a screen.
pub const RUN_POINTS: u32 = 1000;
const COMPARE_POINTS: u32 = 500;
/// Most runs one comparison overlays.
const MAX_COMPARED: usize = 20;
/// Pages of GetMetrics one chart set reads at most (64 series of 1000 points fit in 13).
const MAX_METRIC_PAGES: usize = 32;

type Page = Result<Html<String>, WebError>;

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, WebError> {
    q.map(|Query(q)| q)
        .map_err(|e| WebError::bad_request(e.body_text()))
}

/// The runs table's filters, as the form sends them (empty: no filter).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct RunsQuery {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    /// `key=value`.
    #[serde(default)]
    pub label: String,
    /// A ListJobs page token.
    #[serde(default)]
    pub page: String,
    pub size: Option<u32>,
}

/// A state as the UI names it (`running`), as the API's enum.
fn parse_state(s: &str) -> Result<v1::JobState, WebError> {
    proto::state_from_name(&s.to_ascii_lowercase()).ok_or_else(|| {
        let names: Vec<&str> = proto::JobState::ALL.iter().map(|s| s.as_str()).collect();
        WebError::bad_request(format!(
            "state must be one of {}, got {s:?}",
            names.join(", ")
        ))
    })
}

pub async fn runs(
    State(web): State<Web>,
    Extension(session): Extension<Session>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Page {
    let q = query(q)?;
    let mut req = v1::ListJobsRequest {
        page_size: q.size.unwrap_or(RUNS_PAGE).clamp(1, MAX_RUNS_PAGE),
        page_token: q.page.clone(),
        name_contains: q.name.trim().to_string(),
        ..Default::default()
    };
    if !q.state.is_empty() {
        req.states = vec![parse_state(&q.state)? as i32];
    }
    if !q.kind.is_empty() {
        req.kinds = vec![q.kind.clone()];
    }
    if !q.label.trim().is_empty() {
        let (k, v) = q
            .label
            .split_once('=')
            .ok_or_else(|| WebError::bad_request("label must be key=value"))?;
        req.labels
            .insert(k.trim().to_string(), v.trim().to_string());
    }
    let page = web.api.list_jobs(Web::req(req)).await?.into_inner();
    Ok(Html(views::runs_page(&session, &q, &page).into_string()))
}

/// A job's points (of `names`, or all), every page of GetMetrics, each series downsampled on
/// the server to `max_points` (0: every point).
async fn metric_points(
    web: &Web,
    job_id: &str,
    names: Vec<String>,
    max_points: u32,
) -> Result<Vec<v1::MetricPoint>, WebError> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_METRIC_PAGES {
        let page = web
            .api
            .get_metrics(Web::req(v1::GetMetricsRequest {
                job_id: job_id.to_string(),
                names: names.clone(),
                page_size: 5000,
                page_token: token,
                max_points,
            }))
            .await?
            .into_inner();
        out.extend(page.points);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    Ok(out)
}

/// [`metric_points`] as (step, value) lists by series name.
async fn series(
    web: &Web,
    job_id: &str,
    names: Vec<String>,
    max_points: u32,
) -> Result<BTreeMap<String, Vec<(u64, f64)>>, WebError> {
    let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for p in metric_points(web, job_id, names, max_points).await? {
        out.entry(p.name).or_default().push((p.step, p.value));
    }
    Ok(out)
}

pub async fn run(
    State(web): State<Web>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Page {
    let job = web
        .api
        .get_job(Web::req(v1::GetJobRequest { job_id: id.clone() }))
        .await?
        .into_inner();
    let job_id = parse_job_id("job_id", &job.id).map_err(tonic::Status::from)?;
    // Before the points: the live stream starts after this, so a point stored while the page
    // is built arrives twice (the page drops repeats) rather than never.
    let after = store::last_metric_seq(&web.state.pool, job_id)
        .await
        .map_err(tonic::Status::from)?;
    let series = series(&web, &job.id, Vec::new(), RUN_POINTS).await?;
    let artifacts = web
        .api
        .list_artifacts(Web::req(v1::ListArtifactsRequest {
            job_id: job.id.clone(),
            kind: String::new(),
        }))
        .await?
        .into_inner()
        .artifacts;
    Ok(Html(
        views::run_page(&session, &job, &series, after, &artifacts).into_string(),
    ))
}

pub async fn cancel(
    State(web): State<Web>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response, WebError> {
    check_csrf(&session, &form.map(|f| f.0.csrf).unwrap_or_default())?;
    let job = web
        .api
        .cancel_job(Web::req(v1::CancelJobRequest {
            job_id: id,
            reason: "cancelled from the web UI".into(),
        }))
        .await?
        .into_inner();
    Ok(Redirect::to(&format!("/runs/{}", job.id)).into_response())
}

/// An artifact's bytes: images inline (the run and sweep pages show them), anything else as a
/// download.
pub async fn artifact(
    State(web): State<Web>,
    Path(id): Path<String>,
) -> Result<Response, WebError> {
    let mut chunks = web
        .api
        .download_artifact(Web::req(v1::DownloadArtifactRequest {
            artifact_id: id,
            ..Default::default()
        }))
        .await?
        .into_inner();
    let first = chunks
        .next()
        .await
        .transpose()?
        .ok_or_else(|| WebError::not_found("the artifact has no data"))?;
    let meta = first.artifact.clone().unwrap_or_default();
    let head = futures::stream::once(async move { Ok::<_, tonic::Status>(first.data) });
    let body = Body::from_stream(head.chain(chunks.map(|c| c.map(|c| c.data))));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    if meta.name.ends_with(".png") {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        // Artifact names are [A-Za-z0-9._-] (the store checks), safe in a header as they are.
        if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", meta.name)) {
            headers.insert(header::CONTENT_DISPOSITION, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&meta.size_bytes.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    Ok(response)
}

#[derive(Debug, Default, Deserialize)]
pub struct SweepsQuery {
    #[serde(default)]
    page: String,
}

pub async fn sweeps(
    State(web): State<Web>,
    Extension(session): Extension<Session>,
    q: Result<Query<SweepsQuery>, QueryRejection>,
) -> Page {
    let q = query(q)?;
    let page = web
        .api
        .list_sweeps(Web::req(v1::ListSweepsRequest {
            page_size: RUNS_PAGE,
            page_token: q.page,
        }))
        .await?
        .into_inner();
    Ok(Html(views::sweeps_page(&session, &page).into_string()))
}

/// The arm a sweep is compared with (empty: GetSweepSummary's default, the one random-init arm).
#[derive(Debug, Default, Deserialize)]
pub struct SweepQuery {
    #[serde(default)]
    baseline: String,
}

pub async fn sweep(
    State(web): State<Web>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    q: Result<Query<SweepQuery>, QueryRejection>,
) -> Page {
    let q = query(q)?;
    let sweep = web
        .api
        .get_sweep(Web::req(v1::GetSweepRequest {
            sweep_id: id.clone(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    // A sweep without exactly one random-init arm has no default baseline: the page says so
    // instead of failing.
    let summary = web
        .api
        .get_sweep_summary(Web::req(v1::GetSweepSummaryRequest {
            sweep_id: id,
            baseline_arm: q.baseline,
            ..Default::default()
        }))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string());
    // The arms' mean curves of the convergence metric, from every succeeded run's epoch ends.
    let mut curves = Vec::new();
    if let Ok(summary) = &summary {
        let metric = summary.convergence_metric.clone();
        let mut runs = Vec::new();
        for r in sweep
            .runs
            .iter()
            .filter(|r| !r.source && r.state() == v1::JobState::Succeeded)
        {
            // Every point, with epochs: the curves keep each epoch's end.
            let points = metric_points(&web, &r.job_id, vec![metric.clone()], 0).await?;
            runs.push(proto::report::RunSeries {
                arm: r.arm.clone(),
                seed: r.seed,
                job_id: r.job_id.clone(),
                points,
            });
        }
        curves = proto::report::mean_curves(&metric, &sweep.arms, &runs);
    }
    let mut grids = Vec::new();
    for (arm, seed, job_id) in proto::report::sample_runs(&sweep) {
        let artifacts = web
            .api
            .list_artifacts(Web::req(v1::ListArtifactsRequest {
                job_id: job_id.clone(),
                kind: "samples".into(),
            }))
            .await?
            .into_inner()
            .artifacts;
        if let Some(a) = artifacts.last() {
            grids.push((arm, seed, job_id, a.id.clone()));
        }
    }
    Ok(Html(
        views::sweep_page(&session, &sweep, &summary, &curves, &grids).into_string(),
    ))
}

/// `/compare?run=ID&run=ID&metric=NAME`: the runs' curves of one metric, overlaid.
pub async fn compare(
    State(web): State<Web>,
    Extension(session): Extension<Session>,
    RawQuery(raw): RawQuery,
) -> Page {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| WebError::bad_request(format!("malformed query: {e}")))?;
    let mut ids = Vec::new();
    let mut metric = String::new();
    for (k, v) in pairs {
        match k.as_str() {
            "run" if !v.is_empty() => {
                if !ids.contains(&v) {
                    ids.push(v)
                }
            }
            "run" => {}
            "metric" => metric = v,
            other => {
                return Err(WebError::bad_request(format!(
                    "unknown parameter {other:?} (run, metric)"
                )))
            }
        }
    }
    if ids.len() > MAX_COMPARED {
        return Err(WebError::bad_request(format!(
            "at most {MAX_COMPARED} runs can be compared, got {}",
            ids.len()
        )));
    }
    let mut jobs = Vec::new();
    for id in &ids {
        jobs.push(
            web.api
                .get_job(Web::req(v1::GetJobRequest { job_id: id.clone() }))
                .await?
                .into_inner(),
        );
    }
    let mut names: Vec<String> = jobs
        .iter()
        .flat_map(|j| j.latest_metrics.iter().map(|m| m.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    if metric.is_empty() {
        metric = views::preferred_metric(&names).unwrap_or_default();
    }
    let mut lines = Vec::new();
    if !metric.is_empty() {
        for job in &jobs {
            let s = series(&web, &job.id, vec![metric.clone()], COMPARE_POINTS).await?;
            lines.push((job.clone(), s.get(&metric).cloned().unwrap_or_default()));
        }
    }
    Ok(Html(
        views::compare_page(&session, &names, &metric, &lines).into_string(),
    ))
}

#[derive(Debug, Default, Deserialize)]
pub struct WorkersQuery {
    #[serde(default)]
    all: bool,
}

pub async fn workers(
    State(web): State<Web>,
    Extension(session): Extension<Session>,
    q: Result<Query<WorkersQuery>, QueryRejection>,
) -> Page {
    let q = query(q)?;
    let workers = web
        .api
        .list_workers(Web::req(v1::ListWorkersRequest {
            include_lost: q.all,
        }))
        .await?
        .into_inner()
        .workers;
    Ok(Html(
        views::workers_page(&session, &workers, q.all).into_string(),
    ))
}

pub async fn not_found(uri: axum::http::Uri) -> WebError {
    WebError::not_found(format!("no page at {}", uri.path()))
}
