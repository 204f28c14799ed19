//! Read requests: which jobs ListJobs returns, which points GetMetrics returns (the page and
//! the downsampling), which runs a GetSweep page holds, and the opaque page tokens of the list
//! RPCs, of metric pages and of a sweep's runs.
//!
//! Must not do I/O, and must not parse an id or check a metric name other than through the
//! proto crate's parsers.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use proto::spec::Experiment;
use proto::{v1, JobId, JobState, MetricName, SweepId};
use uuid::Uuid;

use super::{
    parse_job_id, parse_sweep_id, DEFAULT_METRICS_PAGE_SIZE, DEFAULT_PAGE_SIZE,
    DEFAULT_RUNS_PAGE_SIZE, MAX_METRICS_PAGE_SIZE, MAX_METRIC_NAMES, MAX_PAGE_SIZE,
    MAX_POINTS_PER_SERIES, MAX_RUNS_PAGE_SIZE,
};
use crate::error::{Error, Result};

/// Which metric points GetMetrics returns: the series, the page, and the downsampling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsQuery {
    pub job_id: JobId,
    /// Only these names; empty for every metric.
    pub names: Vec<String>,
    /// Points per page, 1..=[`MAX_METRICS_PAGE_SIZE`].
    pub page_size: u32,
    /// Exclusive start: points strictly after this (name, step).
    pub after: Option<MetricsPageToken>,
    /// Most points per series, 2..=[`MAX_POINTS_PER_SERIES`]; `None` for every point.
    pub max_points: Option<u32>,
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
        let names = req
            .names
            .iter()
            .enumerate()
            .map(|(i, name)| Ok(MetricName::parse(&format!("names[{i}]"), name)?.into_string()))
            .collect::<Result<_>>()?;
        let page_size = match req.page_size {
            0 => DEFAULT_METRICS_PAGE_SIZE,
            n if n > MAX_METRICS_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must be at most {MAX_METRICS_PAGE_SIZE} points, got {n}"),
                ))
            }
            n => n,
        };
        let max_points = match req.max_points {
            0 => None,
            n if !(2..=MAX_POINTS_PER_SERIES).contains(&n) => {
                return Err(Error::invalid(
                    "max_points",
                    format!(
                        "must be 0 (every point) or 2 to {MAX_POINTS_PER_SERIES} (the first and last point at least), got {n}"
                    ),
                ))
            }
            n => Some(n),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(MetricsPageToken::decode(token)?),
        };
        Ok(MetricsQuery {
            job_id,
            names,
            page_size,
            after,
            max_points,
        })
    }
}

/// The keyset position after the last point of a GetMetrics page: (name, step), the order of
/// the primary key, so points stored while a client pages cannot shift the pages.
/// Opaque to clients (base64 of `m1:<step>:<name>`), so its layout may change; the prefix keeps
/// a ListJobs token from passing for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsPageToken {
    pub name: String,
    pub step: i64,
}

impl MetricsPageToken {
    const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    pub fn encode(&self) -> String {
        Self::ENGINE.encode(format!("m1:{}:{}", self.step, self.name))
    }

    pub fn decode(token: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "page_token",
                "is not a token from a previous GetMetrics response",
            )
        };
        let bytes = Self::ENGINE.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = text.splitn(3, ':');
        let (Some("m1"), Some(step), Some(name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let step: i64 = step.parse().map_err(|_| bad())?;
        if step < 0 {
            return Err(bad());
        }
        Ok(MetricsPageToken {
            name: MetricName::parse("page_token", name)
                .map_err(|_| bad())?
                .into_string(),
            step,
        })
    }
}

/// Longest `name_contains`.
const MAX_NAME_FILTER_CHARS: usize = 256;

/// Which jobs ListJobs returns, and where the page starts.
#[derive(Debug, Clone, PartialEq)]
pub struct JobQuery {
    /// Empty means every state.
    pub states: Vec<JobState>,
    /// A JSON object the job's labels must contain (`labels @> filter`).
    pub labels: serde_json::Value,
    /// Experiment kinds; empty means every kind.
    pub kinds: Vec<String>,
    /// Text the name contains, ignoring case; empty means any name.
    pub name_contains: String,
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
        for (i, kind) in req.kinds.iter().enumerate() {
            if !Experiment::KINDS.contains(&kind.as_str()) {
                return Err(Error::invalid(
                    format!("kinds[{i}]"),
                    format!(
                        "must be one of {}, got {kind:?}",
                        Experiment::KINDS.join(", ")
                    ),
                ));
            }
        }
        if req.name_contains.chars().count() > MAX_NAME_FILTER_CHARS {
            return Err(Error::invalid(
                "name_contains",
                format!("must be at most {MAX_NAME_FILTER_CHARS} characters"),
            ));
        }
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(PageToken::decode(token)?),
        };
        Ok(JobQuery {
            states,
            labels,
            kinds: req.kinds,
            name_contains: req.name_contains,
            page_size: page_size(req.page_size),
            after,
        })
    }
}

/// A list page size as requested: 0 means [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`].
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

fn parse_state_filter(i: usize, raw: i32) -> Result<JobState> {
    v1::JobState::try_from(raw)
        .ok()
        .and_then(|s| JobState::try_from(s).ok())
        .ok_or_else(|| {
            Error::invalid(
                format!("states[{i}]"),
                format!("must be a job state, got {raw}"),
            )
        })
}

/// The keyset position after the last row of a page: (created_at, id), newest first.
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
            // Job and sweep ids share the one id format.
            id: JobId::parse("page_token", id).map_err(|_| bad())?.as_uuid(),
        })
    }
}

/// Which sweep GetSweep reads, and which page of its runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepQuery {
    pub id: SweepId,
    pub runs: RunPage,
}

/// A page of a sweep's runs: at most `size` runs after position `after` (creation order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunPage {
    pub size: u32,
    /// Exclusive start: runs at positions above this (`None`: from the first).
    pub after: Option<i32>,
}

impl RunPage {
    /// The first page at the default size (what SubmitSweep and CancelSweep answer with).
    pub const FIRST: RunPage = RunPage {
        size: DEFAULT_RUNS_PAGE_SIZE,
        after: None,
    };
}

impl TryFrom<v1::GetSweepRequest> for SweepQuery {
    type Error = Error;

    fn try_from(req: v1::GetSweepRequest) -> Result<Self> {
        let id = parse_sweep_id("sweep_id", &req.sweep_id)?;
        let size = match req.page_size {
            0 => DEFAULT_RUNS_PAGE_SIZE,
            n => n.min(MAX_RUNS_PAGE_SIZE),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(RunPageToken::decode(token)?.position),
        };
        Ok(SweepQuery {
            id,
            runs: RunPage { size, after },
        })
    }
}

/// Where the next page of a sweep's runs starts: the position of the last run sent. Opaque to
/// clients (base64), like [`PageToken`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunPageToken {
    pub position: i32,
}

impl RunPageToken {
    pub fn encode(&self) -> String {
        PageToken::ENGINE.encode(format!("r1:{}", self.position))
    }

    pub fn decode(token: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "page_token",
                "is not a token from a previous response's next_page_token",
            )
        };
        let bytes = PageToken::ENGINE.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let position = text
            .strip_prefix("r1:")
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p >= 0)
            .ok_or_else(bad)?;
        Ok(RunPageToken { position })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::invalid_field;
    use crate::domain::MAX_METRIC_NAME_CHARS;

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
    fn a_get_sweep_page_is_1000_runs_at_most_and_its_token_is_checked() {
        let req = |page_size, page_token: &str| v1::GetSweepRequest {
            sweep_id: Uuid::nil().to_string(),
            page_size,
            page_token: page_token.into(),
        };
        let first = SweepQuery::try_from(req(0, "")).expect("valid");
        assert_eq!(first.runs, RunPage::FIRST);
        assert_eq!(first.runs.size, DEFAULT_RUNS_PAGE_SIZE);
        let big = SweepQuery::try_from(req(1_000_000, "")).expect("valid");
        assert_eq!(big.runs.size, MAX_RUNS_PAGE_SIZE);
        let token = RunPageToken { position: 41 }.encode();
        let next = SweepQuery::try_from(req(10, &token)).expect("valid");
        assert_eq!(
            next.runs,
            RunPage {
                size: 10,
                after: Some(41)
            }
        );
        let list_token = PageToken {
            created_at: DateTime::from_timestamp_micros(1).expect("in range"),
            id: Uuid::nil(),
        }
        .encode();
        let negative = PageToken::ENGINE.encode("r1:-1");
        for bad in ["x", list_token.as_str(), negative.as_str()] {
            assert_eq!(
                invalid_field(SweepQuery::try_from(req(0, bad))),
                "page_token"
            );
        }
        assert_eq!(
            invalid_field(SweepQuery::try_from(v1::GetSweepRequest {
                sweep_id: "nope".into(),
                ..Default::default()
            })),
            "sweep_id"
        );
    }

    #[test]
    fn list_jobs_states_are_job_states_and_unspecified_is_refused() {
        let req = |states: Vec<i32>| v1::ListJobsRequest {
            states,
            ..Default::default()
        };
        let q = JobQuery::try_from(req(vec![
            v1::JobState::Queued as i32,
            v1::JobState::Failed as i32,
        ]))
        .expect("valid");
        assert_eq!(q.states, [JobState::Queued, JobState::Failed]);
        assert_eq!(q.page_size, DEFAULT_PAGE_SIZE);
        assert_eq!(
            invalid_field(JobQuery::try_from(req(vec![
                v1::JobState::Queued as i32,
                v1::JobState::Unspecified as i32
            ]))),
            "states[1]"
        );
        assert_eq!(
            invalid_field(JobQuery::try_from(req(vec![99]))),
            "states[0]"
        );
    }

    #[test]
    fn get_metrics_takes_at_most_64_names_of_1_to_128_characters() {
        let req = |names: Vec<String>| v1::GetMetricsRequest {
            job_id: Uuid::nil().to_string(),
            names,
            ..Default::default()
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
                ..Default::default()
            })),
            "job_id"
        );
    }

    #[test]
    fn a_get_metrics_name_with_a_nul_is_invalid_naming_it() {
        let req = v1::GetMetricsRequest {
            job_id: Uuid::nil().to_string(),
            names: vec!["train/loss".into(), "a\0b".into()],
            ..Default::default()
        };
        assert_eq!(invalid_field(MetricsQuery::try_from(req)), "names[1]");
    }

    fn metrics_request(page_size: u32, page_token: &str, max_points: u32) -> v1::GetMetricsRequest {
        v1::GetMetricsRequest {
            job_id: Uuid::nil().to_string(),
            names: vec![],
            page_size,
            page_token: page_token.into(),
            max_points,
        }
    }

    #[test]
    fn a_metrics_page_token_survives_a_round_trip_and_garbage_or_a_list_jobs_token_is_refused() {
        for t in [
            MetricsPageToken {
                name: "train/loss".into(),
                step: 0,
            },
            MetricsPageToken {
                name: "a:b:c é".into(),
                step: i64::MAX,
            },
        ] {
            assert_eq!(
                MetricsPageToken::decode(&t.encode()).expect("round trip"),
                t
            );
        }
        let list_jobs = PageToken {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("in range"),
            id: Uuid::now_v7(),
        }
        .encode();
        let engine = MetricsPageToken::ENGINE;
        let long_name = format!("m1:1:{}", "x".repeat(MAX_METRIC_NAME_CHARS + 1));
        for bad in [
            "x".to_owned(),
            "!!!".to_owned(),
            list_jobs,
            engine.encode("m1:-1:train/loss"),
            engine.encode("m1:1:"),
            engine.encode("m1:one:train/loss"),
            engine.encode("m1:1:a\0b"),
            engine.encode("m2:1:train/loss"),
            engine.encode(long_name),
            engine.encode([b'm', b'1', b':', b'1', b':', 0xff]),
        ] {
            match MetricsPageToken::decode(&bad) {
                Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "page_token"),
                other => panic!("{bad:?} gave {other:?}"),
            }
            assert_eq!(
                invalid_field(MetricsQuery::try_from(metrics_request(0, &bad, 0))),
                "page_token"
            );
        }
    }

    #[test]
    fn get_metrics_pages_hold_1000_points_by_default_and_more_than_5000_is_invalid_naming_page_size(
    ) {
        let q = MetricsQuery::try_from(metrics_request(0, "", 0)).expect("defaults");
        assert_eq!(q.page_size, DEFAULT_METRICS_PAGE_SIZE);
        assert_eq!(q.after, None);
        assert_eq!(q.max_points, None);
        let q = MetricsQuery::try_from(metrics_request(MAX_METRICS_PAGE_SIZE, "", 0))
            .expect("at the limit");
        assert_eq!(q.page_size, MAX_METRICS_PAGE_SIZE);
        assert_eq!(
            invalid_field(MetricsQuery::try_from(metrics_request(
                MAX_METRICS_PAGE_SIZE + 1,
                "",
                0
            ))),
            "page_size"
        );
        let token = MetricsPageToken {
            name: "train/loss".into(),
            step: 7,
        };
        let q = MetricsQuery::try_from(metrics_request(10, &token.encode(), 0)).expect("valid");
        assert_eq!(q.after, Some(token));
    }

    #[test]
    fn get_metrics_max_points_is_0_or_2_to_10000_and_anything_else_is_invalid_naming_max_points() {
        for (n, want) in [
            (0, None),
            (2, Some(2)),
            (MAX_POINTS_PER_SERIES, Some(MAX_POINTS_PER_SERIES)),
        ] {
            let q = MetricsQuery::try_from(metrics_request(0, "", n)).expect("valid");
            assert_eq!(q.max_points, want);
        }
        for n in [1, MAX_POINTS_PER_SERIES + 1, u32::MAX] {
            assert_eq!(
                invalid_field(MetricsQuery::try_from(metrics_request(0, "", n))),
                "max_points"
            );
        }
    }

    #[test]
    fn a_full_page_of_the_longest_names_and_largest_numbers_encodes_under_4_mib() {
        use prost::Message as _;
        // 128 characters of four bytes each: the longest name a point can carry.
        let name = "\u{1F600}".repeat(MAX_METRIC_NAME_CHARS);
        let point = v1::MetricPoint {
            name: name.clone(),
            step: i64::MAX as u64,
            epoch: u32::MAX,
            value: f64::MIN_POSITIVE,
        };
        let page = v1::GetMetricsResponse {
            points: vec![point; MAX_METRICS_PAGE_SIZE as usize],
            next_page_token: MetricsPageToken {
                name,
                step: i64::MAX,
            }
            .encode(),
        };
        let bytes = page.encoded_len();
        assert!(
            bytes < 4 * 1024 * 1024,
            "a page of {MAX_METRICS_PAGE_SIZE} points is {bytes} bytes"
        );
    }
}
