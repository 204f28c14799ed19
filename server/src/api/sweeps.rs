//! The sweep RPCs of `trainq.v1.JobService`: submit, inspect, list, cancel and watch sweeps,
//! and summarise their results over random seeds.

use std::sync::Arc;

use proto::v1;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::AppState;
use crate::error::{Error, Result};

/// The stream type WatchSweep returns.
pub type SweepEvents = ReceiverStream<Result<v1::Sweep, Status>>;

pub async fn submit(_state: &AppState, _req: v1::SubmitSweepRequest) -> Result<v1::Sweep> {
    Err(Error::Internal(anyhow::anyhow!("not implemented yet")))
}

pub async fn get(_state: &AppState, _req: v1::GetSweepRequest) -> Result<v1::Sweep> {
    Err(Error::Internal(anyhow::anyhow!("not implemented yet")))
}

pub async fn list(
    _state: &AppState,
    _req: v1::ListSweepsRequest,
) -> Result<v1::ListSweepsResponse> {
    Err(Error::Internal(anyhow::anyhow!("not implemented yet")))
}

pub async fn cancel(_state: &AppState, _req: v1::CancelSweepRequest) -> Result<v1::Sweep> {
    Err(Error::Internal(anyhow::anyhow!("not implemented yet")))
}

pub async fn watch(_state: Arc<AppState>, _req: v1::WatchSweepRequest) -> Result<SweepEvents> {
    Err(Error::Internal(anyhow::anyhow!("not implemented yet")))
}

pub async fn summary(
    _state: &AppState,
    _req: v1::GetSweepSummaryRequest,
) -> Result<v1::SweepSummary> {
    Err(Error::Internal(anyhow::anyhow!("not implemented yet")))
}
