//! The coordinator's domain types, parsed from the wire types at the edge with `TryFrom`.
//!
//! Every request field that the store relies on is checked here, so invalid input never travels
//! inward; a violation is [`Error::InvalidArgument`] naming the field path. The job spec itself is
//! validated by [`proto::spec::JobSpec`]. Also holds the retry-backoff policy.
//!
//! Must not do I/O: no SQL, no Redis, no clocks other than the caller's.

use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
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
    Uuid::parse_str(text)
        .map_err(|_| Error::invalid(field, format!("must be a UUID, got {text:?}")))
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

/// How long a job waits before its next attempt, after `attempt` failed: `base * 2^(attempt-1)`,
/// capped at [`MAX_RETRY_BACKOFF`], then drawn uniformly from its upper half so that jobs that
/// failed together do not come back together.
pub fn retry_backoff(base: Duration, attempt: i32, rng: &mut impl Rng) -> Duration {
    let doublings = attempt.saturating_sub(1).clamp(0, 30) as u32;
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
    fn backoff_doubles_per_attempt_within_its_jitter_band_and_is_capped() {
        let mut rng = rand::rng();
        let base = Duration::from_millis(100);
        for attempt in 1..=5 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let d = retry_backoff(base, attempt, &mut rng);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: {d:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
        assert!(retry_backoff(base, 1000, &mut rng) <= MAX_RETRY_BACKOFF);
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
}
