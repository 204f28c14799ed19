//! Read requests: which jobs ListJobs returns, which series GetMetrics returns, which runs a
//! GetSweep page holds, and the opaque page tokens of the list RPCs and of a sweep's runs.
//!
//! Must not do I/O, and must not parse an id or check a metric name other than through the
//! proto crate's parsers.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use proto::{v1, JobId, JobState, MetricName, SweepId};
use uuid::Uuid;

use super::{
    parse_job_id, parse_sweep_id, DEFAULT_PAGE_SIZE, DEFAULT_RUNS_PAGE_SIZE, MAX_METRIC_NAMES,
    MAX_PAGE_SIZE, MAX_RUNS_PAGE_SIZE,
};
use crate::error::{Error, Result};

/// Which metric series GetMetrics returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsQuery {
    pub job_id: JobId,
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
        let names = req
            .names
            .iter()
            .enumerate()
            .map(|(i, name)| Ok(MetricName::parse(&format!("names[{i}]"), name)?.into_string()))
            .collect::<Result<_>>()?;
        Ok(MetricsQuery { job_id, names })
    }
}

/// Which jobs ListJobs returns, and where the page starts.
#[derive(Debug, Clone, PartialEq)]
pub struct JobQuery {
    /// Empty means every state.
    pub states: Vec<JobState>,
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
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(PageToken::decode(token)?),
        };
        Ok(JobQuery {
            states,
            labels,
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
    fn a_get_metrics_name_with_a_nul_is_invalid_naming_it() {
        let req = v1::GetMetricsRequest {
            job_id: Uuid::nil().to_string(),
            names: vec!["train/loss".into(), "a\0b".into()],
        };
        assert_eq!(invalid_field(MetricsQuery::try_from(req)), "names[1]");
    }
}
