//! The coordinator's domain types, parsed from the wire types at the edge with `TryFrom`.
//!
//! Every request field that the store relies on is checked here, so invalid input never travels
//! inward; a violation is [`Error::InvalidArgument`] naming the field path. The job spec itself is
//! validated by [`proto::spec::JobSpec`]; ids go through [`proto::JobId::parse`] and its
//! siblings, metric names through [`proto::MetricName::parse`], and nothing here parses either
//! by hand. The parts:
//!
//! - [`lease`]: a worker's lease, metric points, completions and metric reports;
//! - [`query`]: ListJobs, GetMetrics (paging, downsampling) and GetSweep requests, and page
//!   tokens;
//! - [`request`]: the idempotency keys of SubmitJob and SubmitSweep;
//! - [`artifact`]: artifact kinds, names, upload headers and which artifact a download means;
//! - [`backoff`]: the retry-backoff policy;
//! - [`worker`]: a worker's report of itself (the fleet).
//!
//! This module itself holds the request limits, free-text reasons, worker ids, and where a
//! dependency was named in a spec (for error paths).
//!
//! Must not do I/O: no SQL, no Redis, no clocks other than the caller's.

pub mod artifact;
pub mod backoff;
pub mod lease;
pub mod query;
pub mod request;
pub mod worker;

use proto::spec::{Cvae, Experiment, Init, JobSpec};
use proto::{JobId, JobState, SweepId};

use crate::error::{Error, Result};

pub use artifact::{
    parse_artifact_name, ArtifactHeader, ArtifactKind, ArtifactQuery, ArtifactRef,
    DEFAULT_KEPT_CHECKPOINTS, KEPT_RESUME_STATES, MAX_ARTIFACT_BYTES, MAX_ARTIFACT_KIND_CHARS,
    MAX_ARTIFACT_NAME_CHARS, MAX_UPLOAD_CHUNK_BYTES,
};
pub use backoff::{retry_backoff, MAX_RETRY_BACKOFF};
pub use lease::{parse_points, Completion, Lease, MetricPoint, MetricsReport};
pub use query::{
    JobQuery, MetricsPageToken, MetricsQuery, PageToken, RunPage, RunPageToken, SweepQuery,
};
pub use request::{RequestKey, RequestKind};
pub use worker::{Capacity, WorkerReport};

/// Most points one ReportMetrics call may carry (documented in the .proto).
pub const MAX_POINTS_PER_CALL: usize = 10_000;
/// Longest metric name, in characters.
pub const MAX_METRIC_NAME_CHARS: usize = proto::metric::MAX_NAME_CHARS;
/// Longest worker id, in characters.
pub const MAX_WORKER_ID_CHARS: usize = 256;
/// ListJobs page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest ListJobs page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Runs in a GetSweep page when the request says 0 (and in SubmitSweep's and CancelSweep's
/// answers).
pub const DEFAULT_RUNS_PAGE_SIZE: u32 = 1000;
/// Largest page of a sweep's runs: about 100 KB, at most about 1.5 MB with the longest arm names.
pub const MAX_RUNS_PAGE_SIZE: u32 = 1000;
/// Most metric names one GetMetrics call may ask for (documented in the .proto).
pub const MAX_METRIC_NAMES: usize = 64;
/// GetMetrics page size (points) when the request says 0 (documented in the .proto).
pub const DEFAULT_METRICS_PAGE_SIZE: u32 = 1000;
/// Largest GetMetrics page (points). Even with names of 128 four-byte characters a page stays
/// under gRPC's default 4 MiB receive limit (about 545 bytes a point), which a test checks.
pub const MAX_METRICS_PAGE_SIZE: u32 = 5000;
/// Largest `max_points` (points per series) of a downsampled GetMetrics call.
pub const MAX_POINTS_PER_SERIES: u32 = 10_000;
/// Largest request message either service decodes (documented in the .proto: 8 MiB); a larger
/// one is refused with RESOURCE_EXHAUSTED before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Longest failure or cancellation reason kept in `jobs.error`, in characters.
pub const MAX_REASON_CHARS: usize = 4096;

/// A free-text reason cut to [`MAX_REASON_CHARS`] (a worker's stack trace may be long; the
/// start is what matters), or `default` when empty. A reason is only a record, so U+0000, which
/// Postgres text cannot hold, is dropped rather than refused (a cancel or failure is never lost
/// to it).
pub fn reason_text(text: &str, default: &str) -> String {
    let text = text.replace('\0', "");
    let text = text.trim();
    if text.is_empty() {
        return default.to_owned();
    }
    text.chars().take(MAX_REASON_CHARS).collect()
}

/// Parses a job id; `field` is its path in the request (`job_id`, `lease.job_id`). Hyphenated
/// UUIDs only: braced, URN and simple forms are INVALID_ARGUMENT.
pub fn parse_job_id(field: &str, text: &str) -> Result<JobId> {
    Ok(JobId::parse(field, text)?)
}

/// Parses a sweep id (`sweep_id` of GetSweep, CancelSweep, WatchSweep, GetSweepSummary), with
/// the same strictness as [`parse_job_id`].
pub fn parse_sweep_id(field: &str, text: &str) -> Result<SweepId> {
    Ok(SweepId::parse(field, text)?)
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

// ---------------------------------------------------------------------------------------------
// Dependencies
// ---------------------------------------------------------------------------------------------

/// Where a transfer initialisation names its source job.
pub const TRANSFER_SOURCE_FIELD: &str = "spec.cifar_cvae.init.transfer.source_job_id";

/// The request field that named dependency `id` (one of `spec.dependencies`): its place in
/// `spec.depends_on`, or the transfer's source when it is not listed there.
pub fn dependency_field(spec: &JobSpec, id: JobId) -> String {
    let listed = spec.to_proto().depends_on.len();
    match spec.dependencies.iter().position(|d| *d == id) {
        Some(i) if i < listed => format!("spec.depends_on[{i}]"),
        _ => TRANSFER_SOURCE_FIELD.to_owned(),
    }
}

/// The transfer source of a spec, if it has one.
pub fn transfer_source(spec: &JobSpec) -> Option<JobId> {
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
pub fn dependency_failed(dependency: impl Into<JobId>, state: JobState) -> String {
    format!("dependency_failed: job {} is {state}", dependency.into())
}

/// The field of the INVALID_ARGUMENT that `r` is (the parts' tests check field paths with it).
#[cfg(test)]
pub(crate) fn invalid_field<T: std::fmt::Debug>(r: Result<T>) -> String {
    match r {
        Err(Error::InvalidArgument { field, .. }) => field,
        other => panic!("expected invalid argument, got {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_loses_its_nul_characters_and_keeps_the_rest() {
        assert_eq!(reason_text("stop\0 now\0", "x"), "stop now");
        assert_eq!(
            reason_text("\0\0", "cancelled by user"),
            "cancelled by user"
        );
    }

    #[test]
    fn a_dependency_failure_names_the_job_and_its_state() {
        let id = JobId::from(uuid::Uuid::nil());
        assert_eq!(
            dependency_failed(id, JobState::Cancelled),
            "dependency_failed: job 00000000-0000-0000-0000-000000000000 is cancelled"
        );
    }

    #[test]
    fn a_get_sweep_id_that_is_braced_or_a_urn_is_invalid() {
        let id = uuid::Uuid::now_v7();
        let req = |sweep_id: String| proto::v1::GetSweepRequest {
            sweep_id,
            ..Default::default()
        };
        let ok = req(id.to_string());
        assert_eq!(
            parse_sweep_id("sweep_id", &ok.sweep_id)
                .expect("hyphenated")
                .as_uuid(),
            id
        );
        for bad in [
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            id.simple().to_string(),
        ] {
            let r = req(bad.clone());
            assert!(
                matches!(parse_sweep_id("sweep_id", &r.sweep_id),
                    Err(Error::InvalidArgument { field, .. }) if field == "sweep_id"),
                "{bad}"
            );
        }
    }

    #[test]
    fn job_ids_are_hyphenated_uuids_only() {
        let id = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert_eq!(
            parse_job_id("job_id", id).expect("hyphenated").to_string(),
            id
        );
        for bad in [
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            id.replace('-', ""),
        ] {
            assert!(matches!(parse_job_id("job_id", &bad),
                Err(Error::InvalidArgument { field, .. }) if field == "job_id"));
        }
        assert!(matches!(parse_job_id("job_id", ""),
            Err(Error::InvalidArgument { description, .. }) if description == "is required"));
    }
}
