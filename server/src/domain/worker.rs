//! A worker's report of itself (WorkerService.WorkerHeartbeat), checked: what the `workers`
//! table stores and ListWorkers shows.

use proto::v1;

use super::parse_worker_id;
use crate::error::{Error, Result};

/// Longest host name (DNS).
pub const MAX_HOST_CHARS: usize = 253;
/// Longest version string.
pub const MAX_VERSION_CHARS: usize = 64;
/// Most devices one worker reports.
pub const MAX_DEVICES: usize = 16;
/// Longest device name (`cuda:0`).
pub const MAX_DEVICE_NAME_CHARS: usize = 32;
/// Most queues one worker serves.
pub const MAX_QUEUES: usize = 16;
/// Most slots one worker reports (the worker's `--slots` maximum).
pub const MAX_SLOTS: u32 = 64;

/// What a claiming worker slot can run (ClaimJobRequest.device_kind, .free_gpu_memory_mib).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// `None`: a worker that states nothing, which may claim anything.
    pub device: Option<proto::spec::DeviceKind>,
    /// Free GPU memory on a CUDA worker, MiB; `None` when unknown (no memory check).
    pub free_gpu_mib: Option<u32>,
}

impl Capacity {
    /// Anything fits (a worker that states no capacity).
    pub const ANY: Capacity = Capacity {
        device: None,
        free_gpu_mib: None,
    };

    pub fn parse(device_kind: &str, free_gpu_mib: Option<u32>) -> Result<Self> {
        use proto::spec::DeviceKind;
        let device = match device_kind {
            "" => None,
            "cpu" => Some(DeviceKind::Cpu),
            "cuda" => Some(DeviceKind::Cuda),
            other => {
                return Err(Error::invalid(
                    "device_kind",
                    format!("must be cpu, cuda or empty, got {other:?}"),
                ))
            }
        };
        Ok(Self {
            device,
            free_gpu_mib,
        })
    }
}

/// One training device and its memory, in bytes (0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
}

/// A checked WorkerHeartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub worker_id: String,
    pub instance_id: String,
    pub host: String,
    pub version: String,
    pub devices: Vec<Device>,
    pub slots_total: u32,
    pub slots_busy: u32,
    pub queues: Vec<String>,
}

fn short_text(field: &str, text: &str, max: usize) -> Result<String> {
    if text.chars().count() > max || text.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} printable characters"),
        ));
    }
    Ok(text.to_owned())
}

impl TryFrom<v1::WorkerHeartbeatRequest> for WorkerReport {
    type Error = Error;

    fn try_from(req: v1::WorkerHeartbeatRequest) -> Result<Self> {
        let worker_id = parse_worker_id("worker_id", &req.worker_id)?;
        let instance_id = short_text("instance_id", &req.instance_id, 64)?;
        let host = short_text("host", &req.host, MAX_HOST_CHARS)?;
        let version = short_text("version", &req.version, MAX_VERSION_CHARS)?;
        if req.devices.len() > MAX_DEVICES {
            return Err(Error::invalid(
                "devices",
                format!("at most {MAX_DEVICES} devices, got {}", req.devices.len()),
            ));
        }
        let devices = req
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Ok(Device {
                    name: short_text(
                        &format!("devices[{i}].name"),
                        &d.name,
                        MAX_DEVICE_NAME_CHARS,
                    )?,
                    memory_total_bytes: d.memory_total_bytes,
                    memory_used_bytes: d.memory_used_bytes,
                })
            })
            .collect::<Result<_>>()?;
        if req.slots_total == 0 || req.slots_total > MAX_SLOTS {
            return Err(Error::invalid(
                "slots_total",
                format!("must be between 1 and {MAX_SLOTS}, got {}", req.slots_total),
            ));
        }
        if req.slots_busy > req.slots_total {
            return Err(Error::invalid(
                "slots_busy",
                format!(
                    "must be at most slots_total ({}), got {}",
                    req.slots_total, req.slots_busy
                ),
            ));
        }
        if req.queues.is_empty() || req.queues.len() > MAX_QUEUES {
            return Err(Error::invalid(
                "queues",
                format!("1 to {MAX_QUEUES} queues, got {}", req.queues.len()),
            ));
        }
        for (i, q) in req.queues.iter().enumerate() {
            proto::queue::check_queue_name(&format!("queues[{i}]"), q)?;
        }
        Ok(Self {
            worker_id,
            instance_id,
            host,
            version,
            devices,
            slots_total: req.slots_total,
            slots_busy: req.slots_busy,
            queues: req.queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> v1::WorkerHeartbeatRequest {
        v1::WorkerHeartbeatRequest {
            worker_id: "w1".into(),
            host: "gpu-01".into(),
            version: "0.1.0".into(),
            devices: vec![v1::WorkerDevice {
                name: "cuda:0".into(),
                memory_total_bytes: 80 << 30,
                memory_used_bytes: 1 << 30,
            }],
            slots_total: 4,
            slots_busy: 1,
            queues: vec!["gpu".into(), "default".into()],
            instance_id: "abc".into(),
        }
    }

    fn field_of(req: v1::WorkerHeartbeatRequest) -> String {
        match WorkerReport::try_from(req) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn a_capacity_names_cpu_or_cuda_or_nothing() {
        assert_eq!(Capacity::parse("", None).expect("empty"), Capacity::ANY);
        let cuda = Capacity::parse("cuda", Some(8000)).expect("cuda");
        assert_eq!(cuda.device, Some(proto::spec::DeviceKind::Cuda));
        match Capacity::parse("tpu", None) {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "device_kind"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_report_is_checked_field_by_field() {
        let report = WorkerReport::try_from(valid()).expect("valid");
        assert_eq!(report.queues, ["gpu", "default"]);
        let mut r = valid();
        r.worker_id.clear();
        assert_eq!(field_of(r), "worker_id");
        let mut r = valid();
        r.slots_total = 0;
        assert_eq!(field_of(r), "slots_total");
        let mut r = valid();
        r.slots_busy = 5;
        assert_eq!(field_of(r), "slots_busy");
        let mut r = valid();
        r.queues = vec![];
        assert_eq!(field_of(r), "queues");
        let mut r = valid();
        r.queues = vec!["gpu".into(), "Bad Queue".into()];
        assert_eq!(field_of(r), "queues[1]");
        let mut r = valid();
        r.devices[0].name = "x".repeat(33);
        assert_eq!(field_of(r), "devices[0].name");
        let mut r = valid();
        r.host = "h\n".into();
        assert_eq!(field_of(r), "host");
    }
}
