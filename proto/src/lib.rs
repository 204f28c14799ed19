//! trainq's wire contract: everything that crosses a process boundary.
//!
//! - [`v1`]: the generated `trainq.v1` protobuf messages and the tonic client and server stubs,
//!   with their proto3 JSON mapping (serde through pbjson).
//! - [`FILE_DESCRIPTOR_SET`]: served by the coordinator through gRPC reflection.
//! - [`spec`]: the validated domain form of a job spec, parsed from the wire type at the edge.
//! - [`queue`]: the Redis key layout shared by the coordinator's and the worker's dispatch modules.
//! - [`state`]: `JobState`, `AttemptOutcome`, `SweepState` (names, wire values, `is_terminal`).
//! - [`codec`]: the stubs' codec (prost's, with undecodable messages as INVALID_ARGUMENT).
//! - [`ids`]: `JobId`, `SweepId`, `ArtifactId`, the one parser of ids.
//! - [`metric`]: the shared contract's metric names and `MetricName`, the one check of a name.
//! - [`report`]: verdicts and mean curves of a sweep summary (the CLI report and the web UI).
//! - `stat`: `v1::Stat` from the `stats` crate's `Stat` (the statistics are computed there).
//!
//! This crate must not depend on a database, Redis client or libtorch: it is the contract only.

pub mod codec;
pub mod ids;
pub mod metric;
pub mod ops;
pub mod queue;
pub mod report;
pub mod spec;
mod stat;
pub mod state;
pub mod sweep;

pub use ids::{ArtifactId, JobId, SweepId};
pub use metric::MetricName;
pub use state::{AttemptOutcome, JobState, SweepState};

/// Generated `trainq.v1` types and services.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/trainq.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/trainq.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of every trainq proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trainq_descriptor.bin"));

pub use pbjson_types::Timestamp;
/// `google.protobuf.Value` (a grid axis value), with serde to and from plain JSON.
pub use pbjson_types::Value;

/// Converts a `JobState` wire value to its lowercase name (`queued`, `running`, ...), the form
/// stored in Postgres and shown to people; `unspecified` for the wire's zero value.
pub fn state_name(state: v1::JobState) -> &'static str {
    JobState::try_from(state).map_or("unspecified", JobState::as_str)
}

/// The inverse of [`state_name`].
pub fn state_from_name(name: &str) -> Option<v1::JobState> {
    JobState::from_name(name).map(v1::JobState::from)
}
