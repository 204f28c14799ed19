//! Prometheus metrics of a worker, served as text on `GET /metrics` of `--metrics-listen`
//! (default `0.0.0.0:9092`): its slots and how many are training, how its jobs ended, the training
//! throughput (images per second of the latest window, as reported in `train/images_per_s`),
//! coordinator calls that failed, and the memory in use on each NVIDIA GPU.
//!
//! GPU memory comes from NVML (`libnvidia-ml.so.1`, which the NVIDIA driver installs and the
//! container toolkit mounts), read at scrape time; it is the device's memory in use by every
//! process, as `nvidia-smi` shows it. On a host without NVML the GPU series are absent and
//! `trainq_worker_gpu_metrics_available` is 0. Must not make training fail: recording is
//! infallible.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder as _, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::net::TcpListener;

use proto::metric as metric_names;

use crate::train::Event;

/// The worker's metrics.
pub struct Metrics {
    registry: Registry,
    busy: IntGauge,
    slots: IntGauge,
    jobs: IntCounterVec,
    images_per_second: Gauge,
    metric_points: IntCounter,
    call_failures: IntCounterVec,
    gpu_available: IntGauge,
    gpu_used: IntGaugeVec,
    gpu_total: IntGaugeVec,
    nvml: Option<nvml_wrapper::Nvml>,
}

/// How a job ended on this worker, as far as this worker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Succeeded,
    Failed,
    /// Stopped at shutdown and handed back for another worker.
    HandedBack,
    /// The lease was lost (cancelled, or expired and given to another worker).
    Abandoned,
}

impl JobEnd {
    fn label(self) -> &'static str {
        match self {
            JobEnd::Succeeded => proto::AttemptOutcome::Succeeded.as_str(),
            JobEnd::Failed => proto::AttemptOutcome::Failed.as_str(),
            JobEnd::HandedBack => proto::AttemptOutcome::HandedBack.as_str(),
            JobEnd::Abandoned => "abandoned",
        }
    }
}

impl Metrics {
    /// A registry for this worker; `worker_id` and `device` label `trainq_worker_info`.
    pub fn new(worker_id: &str, device: &str) -> Self {
        let registry = Registry::new();
        let info = IntGaugeVec::new(
            Opts::new(
                "trainq_worker_info",
                "This worker: its id and training device.",
            ),
            &["worker_id", "device"],
        )
        .expect("valid metric");
        info.with_label_values(&[worker_id, device]).set(1);
        let slots = IntGauge::new(
            "trainq_worker_slots",
            "Jobs this worker trains at once at most (--slots).",
        )
        .expect("valid metric");
        let busy = IntGauge::new(
            "trainq_worker_busy",
            "Slots training a job now (0 when idle).",
        )
        .expect("valid metric");
        let jobs = IntCounterVec::new(
            Opts::new(
                "trainq_worker_jobs_total",
                "Attempts this worker ran, by how they ended.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let images_per_second = Gauge::new(
            "trainq_worker_train_images_per_second",
            "Training throughput of the latest reported window (train/images_per_s); 0 when idle.",
        )
        .expect("valid metric");
        let metric_points = IntCounter::new(
            "trainq_worker_metric_points_total",
            "Metric points produced by training.",
        )
        .expect("valid metric");
        let call_failures = IntCounterVec::new(
            Opts::new(
                "trainq_worker_coordinator_call_failures_total",
                "Calls to the coordinator that failed (and were retried or given up), by call.",
            ),
            &["call"],
        )
        .expect("valid metric");
        let gpu_available = IntGauge::new(
            "trainq_worker_gpu_metrics_available",
            "1 when NVML could be loaded and GPU memory is reported, else 0.",
        )
        .expect("valid metric");
        let gpu_used = IntGaugeVec::new(
            Opts::new(
                "trainq_worker_gpu_memory_used_bytes",
                "Memory in use on the GPU (all processes), from NVML at scrape time.",
            ),
            &["gpu"],
        )
        .expect("valid metric");
        let gpu_total = IntGaugeVec::new(
            Opts::new(
                "trainq_worker_gpu_memory_total_bytes",
                "Memory of the GPU, from NVML.",
            ),
            &["gpu"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(info) as Box<dyn prometheus::core::Collector>,
            Box::new(busy.clone()),
            Box::new(slots.clone()),
            Box::new(jobs.clone()),
            Box::new(images_per_second.clone()),
            Box::new(metric_points.clone()),
            Box::new(call_failures.clone()),
            Box::new(gpu_available.clone()),
            Box::new(gpu_used.clone()),
            Box::new(gpu_total.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        for end in [
            JobEnd::Succeeded,
            JobEnd::Failed,
            JobEnd::HandedBack,
            JobEnd::Abandoned,
        ] {
            jobs.with_label_values(&[end.label()]).reset();
        }
        let nvml = match nvml_wrapper::Nvml::init() {
            Ok(nvml) => Some(nvml),
            Err(e) => {
                tracing::debug!(error = %e, "NVML not available: no GPU memory metrics");
                None
            }
        };
        gpu_available.set(i64::from(nvml.is_some()));
        Self {
            registry,
            busy,
            slots,
            jobs,
            images_per_second,
            metric_points,
            call_failures,
            gpu_available,
            gpu_used,
            gpu_total,
            nvml,
        }
    }

    /// How many slots this worker runs.
    pub fn set_slots(&self, slots: u32) {
        self.slots.set(i64::from(slots));
    }

    /// A slot started training a job.
    pub fn job_started(&self) {
        self.busy.inc();
    }

    /// A slot's job ended.
    pub fn job_ended(&self, end: JobEnd) {
        self.busy.dec();
        if self.busy.get() <= 0 {
            self.images_per_second.set(0.0);
        }
        self.jobs.with_label_values(&[end.label()]).inc();
    }

    /// Slots training a job now.
    pub fn slots_busy(&self) -> u32 {
        self.busy.get().max(0) as u32
    }

    /// Memory of the GPU behind `device` in bytes, in all and in use, when NVML knows it.
    pub fn gpu_memory_bytes(&self, device: &tch::Device) -> Option<(u64, u64)> {
        let tch::Device::Cuda(index) = device else {
            return None;
        };
        let nvml = self.nvml.as_ref()?;
        let memory = nvml
            .device_by_index(*index as u32)
            .and_then(|d| d.memory_info());
        memory.ok().map(|m| (m.total, m.used))
    }

    /// Total memory of the GPU behind `device` in MiB, when `device` is CUDA and NVML knows it.
    pub fn gpu_memory_mib(&self, device: &tch::Device) -> Option<u64> {
        self.gpu_memory_bytes(device)
            .map(|(total, _)| total / (1024 * 1024))
    }

    /// Training reported `event`.
    pub fn saw(&self, event: &Event) {
        if let Event::Metrics(points) = event {
            self.metric_points.inc_by(points.len() as u64);
            if let Some(latest) = points
                .iter()
                .rev()
                .find(|p| p.name == metric_names::TRAIN_IMAGES_PER_S)
            {
                self.images_per_second.set(latest.value);
            }
        }
    }

    /// A call to the coordinator (`heartbeat`, `report`, `claim`, `finish`) failed.
    pub fn call_failed(&self, call: &str) {
        self.call_failures.with_label_values(&[call]).inc();
    }

    /// Reads the GPUs' memory, then renders every metric in the text exposition format.
    pub fn scrape(&self) -> String {
        if let Some(nvml) = &self.nvml {
            let count = nvml.device_count().unwrap_or(0);
            for i in 0..count {
                let memory = nvml.device_by_index(i).and_then(|d| d.memory_info());
                match memory {
                    Ok(m) => {
                        let gpu = i.to_string();
                        let clamp = |b: u64| i64::try_from(b).unwrap_or(i64::MAX);
                        self.gpu_used.with_label_values(&[&gpu]).set(clamp(m.used));
                        self.gpu_total
                            .with_label_values(&[&gpu])
                            .set(clamp(m.total));
                    }
                    Err(e) => tracing::debug!(gpu = i, error = %e, "NVML: no memory info"),
                }
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics: cannot encode");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Whether GPU memory is reported.
    pub fn gpu_available(&self) -> bool {
        self.gpu_available.get() == 1
    }
}

/// Serves `GET /metrics` on `listener` until the process ends. NVML calls block for
/// microseconds to milliseconds, so a scrape runs on the blocking pool.
pub async fn serve(metrics: Arc<Metrics>, listener: TcpListener) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                let text = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::task::spawn_blocking(move || metrics.scrape()),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Metric;

    fn point(name: &str, value: f64) -> Metric {
        Metric {
            name: name.into(),
            step: 1,
            epoch: 1,
            value,
        }
    }

    #[test]
    fn training_events_and_job_ends_show_up() {
        let m = Metrics::new("w-1", "cpu");
        m.job_started();
        m.saw(&Event::Metrics(vec![
            point(metric_names::TRAIN_IMAGES_PER_S, 1000.0),
            point(metric_names::TRAIN_LOSS, 0.5),
            point(metric_names::TRAIN_IMAGES_PER_S, 1234.5),
        ]));
        let text = m.scrape();
        assert!(text.contains("trainq_worker_busy 1"), "{text}");
        assert!(
            text.contains("trainq_worker_train_images_per_second 1234.5"),
            "{text}"
        );
        assert!(
            text.contains("trainq_worker_metric_points_total 3"),
            "{text}"
        );
        assert!(
            text.contains("trainq_worker_info{device=\"cpu\",worker_id=\"w-1\"} 1"),
            "{text}"
        );
        m.job_ended(JobEnd::Succeeded);
        m.call_failed("heartbeat");
        let text = m.scrape();
        assert!(text.contains("trainq_worker_busy 0"), "{text}");
        assert!(
            text.contains("trainq_worker_train_images_per_second 0"),
            "{text}"
        );
        assert!(
            text.contains("trainq_worker_jobs_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trainq_worker_jobs_total{outcome=\"failed\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("trainq_worker_coordinator_call_failures_total{call=\"heartbeat\"} 1"),
            "{text}"
        );
        // Without a GPU driver the GPU series are absent, never made up.
        if !m.gpu_available() {
            assert!(
                text.contains("trainq_worker_gpu_metrics_available 0"),
                "{text}"
            );
            assert!(
                !text.contains("trainq_worker_gpu_memory_used_bytes{"),
                "{text}"
            );
        }
    }
}
