//! The worker's report of itself to the coordinator (WorkerService.WorkerHeartbeat): at start
//! and then every heartbeat interval, whether or not it trains, so `trainq workers` shows it
//! with its slots, queues and device memory. A failed report is logged and the next one tries
//! again; nothing waits on it.

use std::sync::Arc;
use std::time::Duration;

use proto::v1::{WorkerDevice, WorkerHeartbeatRequest};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::coordinator::Client;
use crate::metrics::Metrics;

/// What does not change while the worker runs.
pub struct Identity {
    pub worker_id: String,
    pub device: tch::Device,
    pub slots: u32,
    pub queues: Vec<String>,
}

/// The host name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else empty.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default()
}

fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Reports every `every` until `shutdown`.
pub async fn report(
    client: Client,
    identity: Identity,
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let instance_id = uuid::Uuid::new_v4().to_string();
    let host = host_name();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (total, used) = metrics.gpu_memory_bytes(&identity.device).unwrap_or((0, 0));
        let request = WorkerHeartbeatRequest {
            worker_id: identity.worker_id.clone(),
            host: host.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            devices: vec![WorkerDevice {
                name: device_name(identity.device),
                memory_total_bytes: total,
                memory_used_bytes: used,
            }],
            slots_total: identity.slots,
            slots_busy: metrics.slots_busy().min(identity.slots),
            queues: identity.queues.clone(),
            instance_id: instance_id.clone(),
        };
        let mut client = client.clone();
        match client.worker_heartbeat(request).await {
            Ok(_) => failing = false,
            Err(status) if !failing => {
                failing = true;
                metrics.call_failed("worker_heartbeat");
                warn!(error = %status, "worker heartbeat failed; retrying every interval");
            }
            Err(status) => {
                metrics.call_failed("worker_heartbeat");
                debug!(error = %status, "worker heartbeat failed");
            }
        }
    }
}
