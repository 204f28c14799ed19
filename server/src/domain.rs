//! The coordinator's domain types, parsed from the wire types at the edge with `TryFrom`.
//!
//! Every request field that the store relies on is checked here, so invalid input never travels
//! inward; a violation is [`Error::InvalidArgument`] naming the field path. The job spec itself is
//! validated by [`proto::spec::JobSpec`]. Also holds the retry-backoff policy, where a
//! dependency was named in a spec (for error paths), and the artifact limits.
//!
//! Must not do I/O: no SQL, no Redis, no clocks other than the caller's.

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use proto::spec::{Cvae, Experiment, Init, JobSpec};
use proto::v1;
use rand::Rng;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Most points one ReportMetrics call may carry (documented in the .proto).
pub const MAX_POINTS_PER_CALL: usize = 10_000;
/// Longest metric name, in characters.
pub const MAX_METRIC_NAME_CHARS: usize = 128;
/// Longest worker id, in characters.
pub const MAX_WORKER_ID_CHARS: usize = 256;
/// ListJobs page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest ListJobs page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most metric names one GetMetrics call may ask for (documented in the .proto).
pub const MAX_METRIC_NAMES: usize = 64;
/// Largest request message either service decodes (documented in the .proto: 8 MiB); a larger
/// one is refused with RESOURCE_EXHAUSTED before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Longest delay before a retry, whatever the attempt number.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(3600);

/// Longest failure or cancellation reason kept in `jobs.error`, in characters.
pub const MAX_REASON_CHARS: usize = 4096;

/// A free-text reason cut to [`MAX_REASON_CHARS`] (a worker's stack trace may be long; the
/// start is what matters), or `default` when empty.
pub fn reason_text(text: &str, default: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return default.to_owned();
    }
    text.chars().take(MAX_REASON_CHARS).collect()
}

/// States a job never leaves.
pub const TERMINAL_STATES: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// True for `succeeded`, `failed` and `cancelled`.
pub fn is_terminal(state: &str) -> bool {
    TERMINAL_STATES.contains(&state)
}

/// Parses a job id; `field` is its path in the request (`job_id`, `lease.job_id`).
pub fn parse_job_id(field: &str, text: &str) -> Result<Uuid> {
    if text.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    parse_uuid_field(field, text)
}

/// Checks a worker id: non-empty, bounded, printable.
pub fn parse_worker_id(field: &str, text: &str) -> Result<String> {
    let n = text.chars().count();
    if n == 0 {
        return Err(Error::invalid(field, "is required"));
    }
    if n > MAX_WORKER_ID_CHARS || text.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_WORKER_ID_CHARS} printable characters"),
        ));
    }
    Ok(text.to_owned())
}

/// A worker's claim on one attempt of a job. Every worker write carries one; the store refuses
/// writes whose lease is not the job's current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: Uuid,
    /// 1-based claim number (`jobs.attempt`).
    pub attempt: i32,
    pub worker_id: String,
}

impl TryFrom<Option<v1::JobLease>> for Lease {
    type Error = Error;

    fn try_from(lease: Option<v1::JobLease>) -> Result<Self> {
        let lease = lease.ok_or_else(|| Error::invalid("lease", "is required"))?;
        let job_id = parse_job_id("lease.job_id", &lease.job_id)?;
        let attempt = i32::try_from(lease.attempt)
            .ok()
            .filter(|a| *a >= 1)
            .ok_or_else(|| {
                Error::invalid(
                    "lease.attempt",
                    format!("must be a claimed attempt (>= 1), got {}", lease.attempt),
                )
            })?;
        let worker_id = parse_worker_id("lease.worker_id", &lease.worker_id)?;
        Ok(Lease {
            job_id,
            attempt,
            worker_id,
        })
    }
}

/// A metric point in the store's integer widths.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    pub name: String,
    pub step: i64,
    pub epoch: i32,
    /// Stored even when not finite: a NaN loss is information.
    pub value: f64,
}

impl From<MetricPoint> for v1::MetricPoint {
    fn from(p: MetricPoint) -> Self {
        // Both widths were checked on the way in, and the columns have CHECK (>= 0).
        v1::MetricPoint {
            name: p.name,
            step: p.step.max(0) as u64,
            epoch: p.epoch.max(0) as u32,
            value: p.value,
        }
    }
}

/// Parses a batch of points; field paths are `points[i].name` and so on.
pub fn parse_points(points: Vec<v1::MetricPoint>) -> Result<Vec<MetricPoint>> {
    if points.len() > MAX_POINTS_PER_CALL {
        return Err(Error::invalid(
            "points",
            format!(
                "at most {MAX_POINTS_PER_CALL} per call, got {}",
                points.len()
            ),
        ));
    }
    points
        .into_iter()
        .enumerate()
        .map(|(i, p)| parse_point(i, p))
        .collect()
}

fn parse_point(i: usize, p: v1::MetricPoint) -> Result<MetricPoint> {
    let n = p.name.chars().count();
    if n == 0 || n > MAX_METRIC_NAME_CHARS {
        return Err(Error::invalid(
            format!("points[{i}].name"),
            format!("must be 1 to {MAX_METRIC_NAME_CHARS} characters, got {n}"),
        ));
    }
    let step = i64::try_from(p.step)
        .map_err(|_| Error::invalid(format!("points[{i}].step"), "is too large"))?;
    let epoch = i32::try_from(p.epoch)
        .map_err(|_| Error::invalid(format!("points[{i}].epoch"), "is too large"))?;
    Ok(MetricPoint {
        name: p.name,
        step,
        epoch,
        value: p.value,
    })
}

// ---------------------------------------------------------------------------------------------
// Dependencies
// ---------------------------------------------------------------------------------------------

/// Where a transfer initialisation names its source job.
pub const TRANSFER_SOURCE_FIELD: &str = "spec.cifar_cvae.init.transfer.source_job_id";

/// The request field that named dependency `id` (one of `spec.dependencies`): its place in
/// `spec.depends_on`, or the transfer's source when it is not listed there.
pub fn dependency_field(spec: &JobSpec, id: proto::JobId) -> String {
    let listed = spec.to_proto().depends_on.len();
    match spec.dependencies.iter().position(|d| *d == id) {
        Some(i) if i < listed => format!("spec.depends_on[{i}]"),
        _ => TRANSFER_SOURCE_FIELD.to_owned(),
    }
}

/// The transfer source of a spec, if it has one.
pub fn transfer_source(spec: &JobSpec) -> Option<proto::JobId> {
    match &spec.experiment {
        Experiment::CifarCvae(Cvae {
            init: Init::Transfer(t),
            ..
        }) => Some(t.source_job_id),
        _ => None,
    }
}

/// The error recorded on a job that can never run because `dependency` ended in `state`
/// (`failed` or `cancelled`).
pub fn dependency_failed(dependency: Uuid, state: &str) -> String {
    format!("dependency_failed: job {dependency} is {state}")
}

// ---------------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------------

/// Largest artifact, in bytes (documented in the .proto: 2 GiB).
pub const MAX_ARTIFACT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Largest data chunk of an upload, in bytes (documented in the .proto: 4 MiB).
pub const MAX_UPLOAD_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Longest artifact kind, in characters.
pub const MAX_ARTIFACT_KIND_CHARS: usize = 32;
/// Longest artifact file name, in characters.
pub const MAX_ARTIFACT_NAME_CHARS: usize = 128;
/// The artifact kind of a resumable training state: it names its step, a claim hands the newest
/// one to the next attempt, and only the newest [`KEPT_RESUME_STATES`] of a job are kept.
pub const RESUME_KIND: &str = "resume";
/// How many `resume` artifacts of a job are kept (the newest by step); older ones are deleted.
/// Two, so that a state that turns out unreadable still leaves one to fall back on.
pub const KEPT_RESUME_STATES: i64 = 2;

/// Checks an artifact kind: 1..=32 characters of `[a-z0-9_-]`.
pub fn parse_artifact_kind(field: &str, text: &str) -> Result<String> {
    let ok = (1..=MAX_ARTIFACT_KIND_CHARS).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "must be 1 to {MAX_ARTIFACT_KIND_CHARS} characters of [a-z0-9_-], got {text:?}"
            ),
        ))
    }
}

/// Checks an artifact file name: 1..=128 characters of `[A-Za-z0-9._-]`, and not `.` or `..`
/// (it becomes the last segment of the object key).
pub fn parse_artifact_name(field: &str, text: &str) -> Result<String> {
    let ok = (1..=MAX_ARTIFACT_NAME_CHARS).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && text != "."
        && text != "..";
    if ok {
        Ok(text.to_owned())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "must be 1 to {MAX_ARTIFACT_NAME_CHARS} characters of [A-Za-z0-9._-] (not . or ..), got {text:?}"
            ),
        ))
    }
}

/// What a worker says about the artifact it is about to upload (the first message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactHeader {
    pub lease: Lease,
    pub kind: String,
    pub name: String,
    /// 1-based epoch; 0 when not tied to an epoch.
    pub epoch: i32,
    /// What the data must add up to; at most [`MAX_ARTIFACT_BYTES`].
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 the data must hash to.
    pub sha256: String,
    /// Global optimiser step; 0 when not tied to a step, at least 1 for [`RESUME_KIND`].
    pub step: i64,
}

impl TryFrom<v1::UploadArtifactHeader> for ArtifactHeader {
    type Error = Error;

    fn try_from(h: v1::UploadArtifactHeader) -> Result<Self> {
        // Lease reports `lease.*`; inside the header it is `header.lease.*`.
        let lease = Lease::try_from(h.lease).map_err(|e| match e {
            Error::InvalidArgument { field, description } => Error::InvalidArgument {
                field: format!("header.{field}"),
                description,
            },
            other => other,
        })?;
        let kind = parse_artifact_kind("header.kind", &h.kind)?;
        let name = parse_artifact_name("header.name", &h.name)?;
        let epoch =
            i32::try_from(h.epoch).map_err(|_| Error::invalid("header.epoch", "is too large"))?;
        let step =
            i64::try_from(h.step).map_err(|_| Error::invalid("header.step", "is too large"))?;
        if kind == RESUME_KIND && step < 1 {
            return Err(Error::invalid(
                "header.step",
                format!("a {RESUME_KIND} artifact must name its step (>= 1), got {step}"),
            ));
        }
        if h.size_bytes > MAX_ARTIFACT_BYTES {
            return Err(Error::invalid(
                "header.size_bytes",
                format!(
                    "must be at most {MAX_ARTIFACT_BYTES} (2 GiB), got {}",
                    h.size_bytes
                ),
            ));
        }
        let hex_ok = h.sha256.len() == 64
            && h.sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(Error::invalid(
                "header.sha256",
                format!("must be 64 lowercase hex digits, got {:?}", h.sha256),
            ));
        }
        Ok(ArtifactHeader {
            lease,
            kind,
            name,
            epoch,
            size_bytes: h.size_bytes,
            sha256: h.sha256,
            step,
        })
    }
}

/// Which artifact a DownloadArtifact request means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactRef {
    /// This one.
    Id(Uuid),
    /// The newest artifact of this kind the job stored.
    Newest { job_id: Uuid, kind: String },
}

impl TryFrom<v1::DownloadArtifactRequest> for ArtifactRef {
    type Error = Error;

    fn try_from(req: v1::DownloadArtifactRequest) -> Result<Self> {
        if !req.artifact_id.is_empty() {
            if !req.job_id.is_empty() || !req.kind.is_empty() {
                return Err(Error::invalid(
                    "artifact_id",
                    "give either artifact_id or job_id and kind, not both",
                ));
            }
            return Ok(ArtifactRef::Id(parse_uuid_field(
                "artifact_id",
                &req.artifact_id,
            )?));
        }
        if req.job_id.is_empty() {
            return Err(Error::invalid(
                "artifact_id",
                "is required (or job_id and kind)",
            ));
        }
        let job_id = parse_job_id("job_id", &req.job_id)?;
        if req.kind.is_empty() {
            return Err(Error::invalid("kind", "is required with job_id"));
        }
        let kind = parse_artifact_kind("kind", &req.kind)?;
        Ok(ArtifactRef::Newest { job_id, kind })
    }
}

/// Which artifacts ListArtifacts returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactQuery {
    pub job_id: Uuid,
    /// Only this kind; `None` for every kind.
    pub kind: Option<String>,
}

impl TryFrom<v1::ListArtifactsRequest> for ArtifactQuery {
    type Error = Error;

    fn try_from(req: v1::ListArtifactsRequest) -> Result<Self> {
        let job_id = parse_job_id("job_id", &req.job_id)?;
        let kind = match req.kind.as_str() {
            "" => None,
            kind => Some(parse_artifact_kind("kind", kind)?),
        };
        Ok(ArtifactQuery { job_id, kind })
    }
}

fn parse_uuid_field(field: &str, text: &str) -> Result<Uuid> {
    Uuid::parse_str(text)
        .map_err(|_| Error::invalid(field, format!("must be a UUID, got {text:?}")))
}

/// Which metric series GetMetrics returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsQuery {
    pub job_id: Uuid,
    /// Only these names; empty for every metric.
    pub names: Vec<String>,
}

impl TryFrom<v1::GetMetricsRequest> for MetricsQuery {
    type Error = Error;

    fn try_from(req: v1::GetMetricsRequest) -> Result<Self> {
        let job_id = parse_job_id("job_id", &req.job_id)?;
        if req.names.len() > MAX_METRIC_NAMES {
            return Err(Error::invalid(
                "names",
                format!("at most {MAX_METRIC_NAMES} names, got {}", req.names.len()),
            ));
        }
        for (i, name) in req.names.iter().enumerate() {
            let n = name.chars().count();
            if n == 0 || n > MAX_METRIC_NAME_CHARS {
                return Err(Error::invalid(
                    format!("names[{i}]"),
                    format!("must be 1 to {MAX_METRIC_NAME_CHARS} characters, got {n}"),
                ));
            }
        }
        Ok(MetricsQuery {
            job_id,
            names: req.names,
        })
    }
}

/// A worker's report that its attempt succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub lease: Lease,
    /// Optimiser steps the job trained in all.
    pub final_step: i64,
}

impl TryFrom<v1::CompleteJobRequest> for Completion {
    type Error = Error;

    fn try_from(req: v1::CompleteJobRequest) -> Result<Self> {
        Ok(Completion {
            lease: Lease::try_from(req.lease)?,
            final_step: i64::try_from(req.final_step)
                .map_err(|_| Error::invalid("final_step", "is too large"))?,
        })
    }
}

/// A worker's batch of metric points for its current attempt.
#[derive(Debug, Clone)]
pub struct MetricsReport {
    pub lease: Lease,
    pub points: Vec<MetricPoint>,
}

impl TryFrom<v1::ReportMetricsRequest> for MetricsReport {
    type Error = Error;

    fn try_from(req: v1::ReportMetricsRequest) -> Result<Self> {
        Ok(MetricsReport {
            lease: Lease::try_from(req.lease)?,
            points: parse_points(req.points)?,
        })
    }
}

/// Which jobs ListJobs returns, and where the page starts.
#[derive(Debug, Clone, PartialEq)]
pub struct JobQuery {
    /// Lowercase state names; empty means every state.
    pub states: Vec<String>,
    /// A JSON object the job's labels must contain (`labels @> filter`).
    pub labels: serde_json::Value,
    pub page_size: u32,
    /// Exclusive start: jobs strictly older than this key.
    pub after: Option<PageToken>,
}

impl TryFrom<v1::ListJobsRequest> for JobQuery {
    type Error = Error;

    fn try_from(req: v1::ListJobsRequest) -> Result<Self> {
        let states = req
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| parse_state_filter(i, *s))
            .collect::<Result<_>>()?;
        proto::spec::validate_labels("labels", &req.labels)?;
        let labels = serde_json::Value::Object(
            req.labels
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect(),
        );
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(PageToken::decode(token)?),
        };
        Ok(JobQuery {
            states,
            labels,
            page_size,
            after,
        })
    }
}

fn parse_state_filter(i: usize, raw: i32) -> Result<String> {
    match v1::JobState::try_from(raw) {
        Ok(v1::JobState::Unspecified) | Err(_) => Err(Error::invalid(
            format!("states[{i}]"),
            format!("must be a job state, got {raw}"),
        )),
        Ok(state) => Ok(proto::state_name(state).to_owned()),
    }
}

/// The keyset position after the last job of a page: (created_at, id), newest first.
/// Opaque to clients (base64), so its layout may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl PageToken {
    const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    pub fn encode(&self) -> String {
        Self::ENGINE.encode(format!(
            "v1:{}:{}",
            self.created_at.timestamp_micros(),
            self.id
        ))
    }

    pub fn decode(token: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "page_token",
                "is not a token from a previous ListJobs response",
            )
        };
        let bytes = Self::ENGINE.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = text.splitn(3, ':');
        let (Some("v1"), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        Ok(PageToken {
            created_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
            id: Uuid::parse_str(id).map_err(|_| bad())?,
        })
    }
}

/// How long a job waits before its next attempt, once `failed_attempts` attempts have failed
/// (counting the one that just did): `base * 2^(failed_attempts-1)`, capped at
/// [`MAX_RETRY_BACKOFF`], then drawn uniformly from its upper half so that jobs that failed
/// together do not come back together. Hand-backs do not count, so they do not lengthen it.
pub fn retry_backoff(base: Duration, failed_attempts: i32, rng: &mut impl Rng) -> Duration {
    let doublings = failed_attempts.saturating_sub(1).clamp(0, 30) as u32;
    let full = base
        .saturating_mul(1u32 << doublings)
        .min(MAX_RETRY_BACKOFF);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(rng.random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_survives_a_round_trip_and_garbage_is_refused() {
        let t = PageToken {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("in range"),
            id: Uuid::now_v7(),
        };
        assert_eq!(PageToken::decode(&t.encode()).expect("round trip"), t);
        for bad in ["x", "!!!", &PageToken::ENGINE.encode("v2:1:nope")] {
            match PageToken::decode(bad) {
                Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "page_token"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn backoff_doubles_per_failed_attempt_within_its_jitter_band_and_is_capped() {
        let mut rng = rand::rng();
        let base = Duration::from_millis(100);
        for failed in 1..=5 {
            let full = base * (1 << (failed - 1));
            let draws: Vec<Duration> = (0..50)
                .map(|_| retry_backoff(base, failed, &mut rng))
                .collect();
            for d in &draws {
                assert!(
                    *d >= full / 2 && *d <= full,
                    "{failed} failed: {d:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
            assert!(
                draws.iter().any(|d| *d != draws[0]),
                "jittered, not one fixed delay"
            );
        }
        for failed in [40, 1000, i32::MAX] {
            let d = retry_backoff(base, failed, &mut rng);
            assert!(
                d >= MAX_RETRY_BACKOFF / 2 && d <= MAX_RETRY_BACKOFF,
                "capped: {d:?}"
            );
        }
    }

    #[test]
    fn a_lease_names_the_field_that_is_wrong() {
        let field = |l: Option<v1::JobLease>| match Lease::try_from(l) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        };
        let good = v1::JobLease {
            job_id: Uuid::nil().to_string(),
            attempt: 1,
            worker_id: "w".into(),
        };
        assert!(Lease::try_from(Some(good.clone())).is_ok());
        assert_eq!(field(None), "lease");
        assert_eq!(
            field(Some(v1::JobLease {
                job_id: "nope".into(),
                ..good.clone()
            })),
            "lease.job_id"
        );
        assert_eq!(
            field(Some(v1::JobLease {
                attempt: 0,
                ..good.clone()
            })),
            "lease.attempt"
        );
        assert_eq!(
            field(Some(v1::JobLease {
                worker_id: String::new(),
                ..good
            })),
            "lease.worker_id"
        );
    }

    #[test]
    fn metric_names_must_be_present_and_short_but_values_may_be_nan() {
        let p = |name: &str, value: f64| v1::MetricPoint {
            name: name.into(),
            step: 1,
            epoch: 1,
            value,
        };
        assert!(parse_points(vec![p("train/loss", f64::NAN)]).is_ok());
        assert!(matches!(parse_points(vec![p("a", 1.0), p("", 1.0)]),
            Err(Error::InvalidArgument { field, .. }) if field == "points[1].name"));
        assert!(parse_points(vec![p(&"x".repeat(129), 1.0)]).is_err());
        let too_many = vec![p("a", 1.0); MAX_POINTS_PER_CALL + 1];
        assert!(
            matches!(parse_points(too_many), Err(Error::InvalidArgument { field, .. }) if field == "points")
        );
    }

    fn invalid_field<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn an_upload_header_is_checked_field_by_field_up_to_two_gib() {
        let good = v1::UploadArtifactHeader {
            lease: Some(v1::JobLease {
                job_id: Uuid::nil().to_string(),
                attempt: 1,
                worker_id: "w".into(),
            }),
            kind: "checkpoint".into(),
            name: "epoch-001.safetensors".into(),
            epoch: 1,
            size_bytes: MAX_ARTIFACT_BYTES,
            sha256: "0".repeat(64),
            step: 0,
        };
        assert!(ArtifactHeader::try_from(good.clone()).is_ok());
        let with = |f: fn(&mut v1::UploadArtifactHeader)| {
            let mut h = good.clone();
            f(&mut h);
            invalid_field(ArtifactHeader::try_from(h))
        };
        assert_eq!(with(|h| h.lease = None), "header.lease");
        assert_eq!(
            with(|h| h.lease.as_mut().expect("lease").attempt = 0),
            "header.lease.attempt"
        );
        assert_eq!(with(|h| h.kind = "Checkpoint".into()), "header.kind");
        assert_eq!(with(|h| h.kind = "k".repeat(33)), "header.kind");
        assert_eq!(with(|h| h.name = "a/b".into()), "header.name");
        assert_eq!(with(|h| h.name = ".".into()), "header.name");
        assert_eq!(with(|h| h.name = String::new()), "header.name");
        assert_eq!(
            with(|h| h.size_bytes = MAX_ARTIFACT_BYTES + 1),
            "header.size_bytes"
        );
        assert_eq!(with(|h| h.sha256 = "A".repeat(64)), "header.sha256");
        assert_eq!(with(|h| h.sha256 = "0".repeat(63)), "header.sha256");
        assert_eq!(with(|h| h.step = u64::MAX), "header.step");
    }

    #[test]
    fn a_resume_artifact_must_name_its_step_and_others_need_not() {
        let header = |kind: &str, step: u64| v1::UploadArtifactHeader {
            lease: Some(v1::JobLease {
                job_id: Uuid::nil().to_string(),
                attempt: 1,
                worker_id: "w".into(),
            }),
            kind: kind.into(),
            name: "state.safetensors".into(),
            epoch: 0,
            size_bytes: 1,
            sha256: "0".repeat(64),
            step,
        };
        assert_eq!(
            invalid_field(ArtifactHeader::try_from(header(RESUME_KIND, 0))),
            "header.step"
        );
        assert_eq!(
            ArtifactHeader::try_from(header(RESUME_KIND, 1))
                .expect("step 1")
                .step,
            1
        );
        assert_eq!(
            ArtifactHeader::try_from(header("checkpoint", 0))
                .expect("no step needed")
                .step,
            0
        );
    }

    #[test]
    fn get_metrics_takes_at_most_64_names_of_1_to_128_characters() {
        let req = |names: Vec<String>| v1::GetMetricsRequest {
            job_id: Uuid::nil().to_string(),
            names,
        };
        let ok = vec!["x".repeat(MAX_METRIC_NAME_CHARS); MAX_METRIC_NAMES];
        assert_eq!(
            MetricsQuery::try_from(req(ok.clone()))
                .expect("at the limits")
                .names,
            ok
        );
        assert_eq!(
            invalid_field(MetricsQuery::try_from(req(vec![
                "a".into();
                MAX_METRIC_NAMES + 1
            ]))),
            "names"
        );
        assert_eq!(
            invalid_field(MetricsQuery::try_from(req(vec!["a".into(), String::new()]))),
            "names[1]"
        );
        assert_eq!(
            invalid_field(MetricsQuery::try_from(req(vec!["é".repeat(129)]))),
            "names[0]"
        );
        assert_eq!(
            invalid_field(MetricsQuery::try_from(v1::GetMetricsRequest {
                job_id: "nope".into(),
                names: vec![],
            })),
            "job_id"
        );
    }

    #[test]
    fn a_completion_carries_its_final_step_within_the_stores_range() {
        let lease = Some(v1::JobLease {
            job_id: Uuid::nil().to_string(),
            attempt: 1,
            worker_id: "w".into(),
        });
        let done = Completion::try_from(v1::CompleteJobRequest {
            lease: lease.clone(),
            final_step: 1234,
        })
        .expect("valid");
        assert_eq!(done.final_step, 1234);
        assert_eq!(
            invalid_field(Completion::try_from(v1::CompleteJobRequest {
                lease,
                final_step: u64::MAX,
            })),
            "final_step"
        );
    }

    #[test]
    fn a_download_names_an_artifact_or_a_job_and_kind_but_not_both() {
        let id = Uuid::now_v7();
        let req = |artifact_id: &str, job_id: &str, kind: &str| v1::DownloadArtifactRequest {
            artifact_id: artifact_id.into(),
            job_id: job_id.into(),
            kind: kind.into(),
        };
        assert_eq!(
            ArtifactRef::try_from(req(&id.to_string(), "", "")).expect("by id"),
            ArtifactRef::Id(id)
        );
        assert_eq!(
            ArtifactRef::try_from(req("", &id.to_string(), "samples")).expect("by kind"),
            ArtifactRef::Newest {
                job_id: id,
                kind: "samples".into()
            }
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("", "", ""))),
            "artifact_id"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("x", "", ""))),
            "artifact_id"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req(
                &id.to_string(),
                &id.to_string(),
                "k"
            ))),
            "artifact_id"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("", &id.to_string(), ""))),
            "kind"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("", "nope", "k"))),
            "job_id"
        );
    }
}
