//! Prometheus metrics of the coordinator, served as text on `GET /metrics` of
//! `--metrics-listen` (default `0.0.0.0:9091`).
//!
//! Counters and histograms are updated where things happen (a claim observes its dispatch
//! latency, the reaper counts lease expiries, the RPC layer times every call). The gauges that
//! describe the system as a whole, jobs by state and each queue's depth and oldest job, are read
//! from Postgres (and Redis answers a PING) when Prometheus scrapes, each bounded by a short timeout: a scrape during an
//! outage answers quickly with the last known values and `trainq_store_up` /
//! `trainq_redis_up` at 0.
//!
//! `trainq_rpc_duration_seconds` is labelled only with the services' own method names, read
//! from their descriptor sets ([`KnownMethods`]): a path a client made up is `unknown`, whether
//! the call was refused by auth, unimplemented, or anything else, so clients cannot create
//! series. `trainq_auth_enabled` and `trainq_insecure_listen` show how exposed the coordinator
//! is (auth off on a non-loopback address).
//!
//! Every coordinator has its own registry (no process-wide default), so several coordinators in
//! one test process do not mix their numbers. Must not make a request fail: recording is
//! infallible and scraping only reads.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder as _, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use prost::Message as _;
use proto::{AttemptOutcome, JobState};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::dispatch::Dispatcher;
use crate::shutdown::Shutdown;
use crate::store;

/// The loops `trainq_background_rounds_total` counts.
pub const BACKGROUND_LOOPS: [&str; 2] = ["reconciler", "lease_reaper"];

/// How long a scrape waits for Postgres or Redis before it reports the last known values.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The coordinator's metrics.
pub struct Metrics {
    registry: Registry,
    jobs: IntGaugeVec,
    queue_depth: IntGaugeVec,
    queue_oldest: GaugeVec,
    /// Every queue that had a series, so a queue that drained reads 0 instead of vanishing.
    queues_seen: std::sync::Mutex<BTreeSet<String>>,
    store_up: IntGauge,
    redis_up: IntGauge,
    dispatch_latency: Histogram,
    lease_expiries: IntCounter,
    retries: IntCounterVec,
    jobs_finished: IntCounterVec,
    rpc_duration: HistogramVec,
    auth_enabled: IntGauge,
    insecure_listen: IntGauge,
    leader: IntGauge,
    change_listener_up: IntGauge,
    background_rounds: IntCounterVec,
    worker_slots_busy: IntGaugeVec,
    worker_slots_total: IntGaugeVec,
    methods: KnownMethods,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let jobs = IntGaugeVec::new(
            Opts::new(
                "trainq_jobs",
                "Jobs in each state (read from Postgres at scrape time).",
            ),
            &["state"],
        )
        .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "trainq_queue_depth",
                "Queued jobs per queue (read from Postgres at scrape time).",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let queue_oldest = GaugeVec::new(
            Opts::new(
                "trainq_queue_oldest_job_age_seconds",
                "Per queue, how long its longest-waiting queued job has been ready (0 when none).",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let store_up = IntGauge::new(
            "trainq_store_up",
            "1 when the last scrape could read Postgres, else 0.",
        )
        .expect("valid metric");
        let redis_up = IntGauge::new(
            "trainq_redis_up",
            "1 when the last scrape could read Redis, else 0.",
        )
        .expect("valid metric");
        let dispatch_latency = Histogram::with_opts(
            HistogramOpts::new(
                "trainq_dispatch_latency_seconds",
                "From the moment a job became ready (submitted, dependencies met, or its retry \
                 backoff over) to its claim by a worker.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                900.0, 3600.0,
            ]),
        )
        .expect("valid metric");
        let lease_expiries = IntCounter::new(
            "trainq_lease_expiries_total",
            "Attempts whose lease expired (their worker went silent) and were taken away.",
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "trainq_retries_total",
                "Failed attempts after which the job was queued again, by cause.",
            ),
            &["cause"],
        )
        .expect("valid metric");
        let jobs_finished = IntCounterVec::new(
            Opts::new(
                "trainq_jobs_finished_total",
                "Jobs whose last attempt ended them (succeeded, or failed for good) on this \
                 coordinator, by state. Cancellations and dependency failures are in trainq_jobs.",
            ),
            &["state"],
        )
        .expect("valid metric");
        let rpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "trainq_rpc_duration_seconds",
                "gRPC calls from request to response headers (for a stream: until it opens), by \
                 service, method and status code.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["service", "method", "code"],
        )
        .expect("valid metric");
        let auth_enabled = IntGauge::new(
            "trainq_auth_enabled",
            "1 when bearer tokens are required (any token configured), 0 when every call is allowed.",
        )
        .expect("valid metric");
        let insecure_listen = IntGauge::new(
            "trainq_insecure_listen",
            "1 when auth is off while gRPC listens on a non-loopback address, else 0.",
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "trainq_leader",
            "1 while this coordinator replica leads the background loops (reconciler, lease \
             reaper), else 0. Exactly one replica of a database leads.",
        )
        .expect("valid metric");
        let change_listener_up = IntGauge::new(
            "trainq_change_listener_up",
            "1 while this coordinator listens to Postgres's change notifications (which wake its \
             watchers), else 0.",
        )
        .expect("valid metric");
        let background_rounds = IntCounterVec::new(
            Opts::new(
                "trainq_background_rounds_total",
                "Rounds of each background loop this replica ran (only the leader runs them).",
            ),
            &["loop"],
        )
        .expect("valid metric");
        let worker_slots_busy = IntGaugeVec::new(
            Opts::new(
                "trainq_worker_slots_busy",
                "Per live worker (one heard from within the lease timeout), the slots running a \
                 job as of its last WorkerHeartbeat (read from Postgres at scrape time).",
            ),
            &["worker"],
        )
        .expect("valid metric");
        let worker_slots_total = IntGaugeVec::new(
            Opts::new(
                "trainq_worker_slots_total",
                "Per live worker, its slots in all (--slots), as of its last WorkerHeartbeat.",
            ),
            &["worker"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queue_depth.clone()),
            Box::new(queue_oldest.clone()),
            Box::new(store_up.clone()),
            Box::new(redis_up.clone()),
            Box::new(dispatch_latency.clone()),
            Box::new(lease_expiries.clone()),
            Box::new(retries.clone()),
            Box::new(jobs_finished.clone()),
            Box::new(rpc_duration.clone()),
            Box::new(auth_enabled.clone()),
            Box::new(insecure_listen.clone()),
            Box::new(leader.clone()),
            Box::new(change_listener_up.clone()),
            Box::new(background_rounds.clone()),
            Box::new(worker_slots_busy.clone()),
            Box::new(worker_slots_total.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        // Every job state has a series (0 when no job is in it) from the first scrape.
        for state in JobState::ALL {
            jobs.with_label_values(&[state.as_str()]).set(0);
        }
        for cause in [AttemptOutcome::Failed, AttemptOutcome::LeaseExpired] {
            retries.with_label_values(&[cause.as_str()]).reset();
        }
        for name in BACKGROUND_LOOPS {
            background_rounds.with_label_values(&[name]).reset();
        }
        // The default queue has a series from the first scrape.
        let default_queue = proto::queue::DEFAULT_QUEUE;
        queue_depth.with_label_values(&[default_queue]).set(0);
        queue_oldest.with_label_values(&[default_queue]).set(0.0);
        Self {
            registry,
            jobs,
            queue_depth,
            queue_oldest,
            queues_seen: std::sync::Mutex::new(BTreeSet::from([default_queue.to_string()])),
            store_up,
            redis_up,
            dispatch_latency,
            lease_expiries,
            retries,
            jobs_finished,
            rpc_duration,
            auth_enabled,
            insecure_listen,
            leader,
            change_listener_up,
            background_rounds,
            worker_slots_busy,
            worker_slots_total,
            methods: KnownMethods::served(),
        }
    }

    /// Records how exposed the gRPC endpoint is: whether auth is on, and whether it is off while
    /// listening on a non-loopback address.
    pub fn exposure(&self, auth_enabled: bool, insecure_listen: bool) {
        self.auth_enabled.set(i64::from(auth_enabled));
        self.insecure_listen.set(i64::from(insecure_listen));
    }

    /// A worker claimed a job that had been ready for `waited`.
    pub fn claimed(&self, waited: Duration) {
        self.dispatch_latency.observe(waited.as_secs_f64());
    }

    /// An attempt ended with the job in `state`: `queued` again is a retry (`cause` says why),
    /// a final state counts as finished.
    pub fn attempt_ended(&self, state: &str, cause: &str) {
        if JobState::from_name(state) == Some(JobState::Queued) {
            self.retries.with_label_values(&[cause]).inc();
        } else {
            self.finished(state);
        }
    }

    /// A job reached a final state.
    pub fn finished(&self, state: &str) {
        self.jobs_finished.with_label_values(&[state]).inc();
    }

    pub fn lease_expired(&self) {
        self.lease_expiries.inc();
    }

    /// Whether this replica leads the background loops now.
    pub fn leader(&self, leads: bool) {
        self.leader.set(i64::from(leads));
    }

    /// Whether the change-notification listener is connected.
    pub fn change_listener_up(&self, up: bool) {
        self.change_listener_up.set(i64::from(up));
    }

    /// One round of a background loop (one of [`BACKGROUND_LOOPS`]) ran here.
    pub fn background_round(&self, name: &'static str) {
        debug_assert!(BACKGROUND_LOOPS.contains(&name));
        self.background_rounds.with_label_values(&[name]).inc();
    }

    /// Reads the gauges that live in Postgres and Redis, then renders every metric in the text
    /// exposition format.
    /// `lease_timeout` says which workers are live (the per-worker gauges show only those).
    pub async fn scrape(
        &self,
        pool: &PgPool,
        dispatcher: &Dispatcher,
        lease_timeout: Duration,
    ) -> String {
        match tokio::time::timeout(SCRAPE_TIMEOUT, store::count_jobs_by_state(pool)).await {
            Ok(Ok(counts)) => {
                for &state in JobState::ALL {
                    let name = state.as_str();
                    let n = counts.iter().find(|(s, _)| *s == state).map_or(0, |c| c.1);
                    self.jobs.with_label_values(&[name]).set(n);
                }
                self.store_up.set(1);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "metrics: cannot count jobs");
                self.store_up.set(0);
            }
            Err(_) => self.store_up.set(0),
        }
        match tokio::time::timeout(SCRAPE_TIMEOUT, store::queue_stats(pool)).await {
            Ok(Ok(stats)) => self.set_queues(&stats),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "metrics: cannot read the queues");
                self.store_up.set(0);
            }
            Err(_) => self.store_up.set(0),
        }
        match tokio::time::timeout(
            SCRAPE_TIMEOUT,
            store::live_worker_slots(pool, lease_timeout),
        )
        .await
        {
            Ok(Ok(workers)) => {
                // Only live workers have series: a lost one's disappear.
                self.worker_slots_busy.reset();
                self.worker_slots_total.reset();
                for (id, busy, total) in &workers {
                    self.worker_slots_busy.with_label_values(&[id]).set(*busy);
                    self.worker_slots_total.with_label_values(&[id]).set(*total);
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "metrics: cannot read the workers");
                self.store_up.set(0);
            }
            Err(_) => self.store_up.set(0),
        }
        match tokio::time::timeout(SCRAPE_TIMEOUT, dispatcher.ping()).await {
            Ok(Ok(())) => self.redis_up.set(1),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "metrics: redis does not answer");
                self.redis_up.set(0);
            }
            Err(_) => self.redis_up.set(0),
        }
        self.render()
    }

    /// Sets each queue's gauges; a queue seen before and absent now is empty.
    fn set_queues(&self, stats: &[store::QueueStat]) {
        let mut seen = crate::lock(&self.queues_seen);
        for stat in stats {
            seen.insert(stat.queue.clone());
        }
        for queue in seen.iter() {
            let stat = stats.iter().find(|s| &s.queue == queue);
            let labels = [queue.as_str()];
            self.queue_depth
                .with_label_values(&labels)
                .set(stat.map_or(0, |s| s.depth));
            self.queue_oldest
                .with_label_values(&labels)
                .set(stat.map_or(0.0, |s| s.oldest_age_s));
        }
    }

    /// Every metric in the Prometheus text format, as it stands.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics: cannot encode");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn rpc_done(&self, path: &str, code: &str, took: Duration) {
        let (service, method) = self.methods.labels(path);
        self.rpc_duration
            .with_label_values(&[service, method, code])
            .observe(took.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The gRPC methods the coordinator serves, by service, from the services' own encoded file
/// descriptor sets (trainq, health, reflection v1 and v1alpha).
#[derive(Debug, Clone, Default)]
pub struct KnownMethods {
    services: HashMap<String, HashSet<String>>,
}

impl KnownMethods {
    /// Every method of every service the coordinator registers.
    pub fn served() -> Self {
        Self::from_descriptor_sets(&[
            proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
    }

    /// The methods of every service in `sets` (encoded `FileDescriptorSet`s; one that does not
    /// decode adds nothing).
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Self {
        let mut services: HashMap<String, HashSet<String>> = HashMap::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                tracing::warn!("metrics: a descriptor set does not decode");
                continue;
            };
            for file in set.file {
                let package = file.package.unwrap_or_default();
                for service in file.service {
                    let name = match (package.as_str(), service.name.as_deref()) {
                        (_, None) => continue,
                        ("", Some(name)) => name.to_owned(),
                        (package, Some(name)) => format!("{package}.{name}"),
                    };
                    services
                        .entry(name)
                        .or_default()
                        .extend(service.method.into_iter().filter_map(|m| m.name));
                }
            }
        }
        Self { services }
    }

    /// The service and method labels of a gRPC path (`/package.Service/Method`): the names
    /// themselves when the service has that method, `("unknown", "unknown")` otherwise. Paths
    /// come from clients; label values must not.
    pub fn labels(&self, path: &str) -> (&str, &str) {
        let known = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .and_then(|(service, method)| {
                let (service, methods) = self.services.get_key_value(service)?;
                Some((service.as_str(), methods.get(method)?.as_str()))
            });
        known.unwrap_or(("unknown", "unknown"))
    }
}

/// A tower layer that times every gRPC call into `trainq_rpc_duration_seconds`.
#[derive(Clone)]
pub struct RpcTimer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcTimer {
    type Service = TimedRpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TimedRpc {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`RpcTimer`] wraps around the gRPC router.
#[derive(Clone)]
pub struct TimedRpc<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for TimedRpc<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            // A status in the headers is a trailers-only answer (an error, as a rule); an OK
            // call carries its status in the trailers, after the body.
            let code = match &response {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport".to_owned(),
            };
            metrics.rpc_done(&path, &code, started.elapsed());
            response
        })
    }
}

/// Serves `GET /metrics` on `listener` until the signal fires.
pub async fn serve(
    metrics: Arc<Metrics>,
    pool: PgPool,
    dispatcher: Arc<Dispatcher>,
    lease_timeout: Duration,
    listener: TcpListener,
    mut signal: Shutdown,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            let pool = pool.clone();
            let dispatcher = dispatcher.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.scrape(&pool, &dispatcher, lease_timeout).await,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { signal.wait().await })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_paths_become_service_and_method_labels_only_when_served() {
        let m = KnownMethods::served();
        assert_eq!(
            m.labels("/trainq.v1.JobService/SubmitJob"),
            ("trainq.v1.JobService", "SubmitJob")
        );
        assert_eq!(
            m.labels("/trainq.v1.WorkerService/ClaimJob"),
            ("trainq.v1.WorkerService", "ClaimJob")
        );
        assert_eq!(
            m.labels("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health", "Check")
        );
        assert_eq!(
            m.labels("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            (
                "grpc.reflection.v1.ServerReflection",
                "ServerReflectionInfo"
            )
        );
        assert_eq!(
            m.labels("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            (
                "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo"
            )
        );
        // Made-up names are unknown whatever the call's outcome (auth refuses them first).
        for path in [
            "/trainq.v1.JobService/MadeUp",
            "/trainq.v1.WorkerService/SubmitJob",
            "/made.Up/Method",
            "/nonsense",
            "trainq.v1.JobService/SubmitJob",
            "/trainq.v1.JobService/SubmitJob/extra",
            "",
        ] {
            assert_eq!(m.labels(path), ("unknown", "unknown"), "{path}");
        }
    }

    #[test]
    fn a_refused_made_up_method_does_not_become_a_series() {
        let m = Metrics::new();
        for made_up in ["A1", "B2", "C3"] {
            // 16: UNAUTHENTICATED, what auth answers before the method is resolved.
            m.rpc_done(
                &format!("/trainq.v1.JobService/{made_up}"),
                "16",
                Duration::from_millis(1),
            );
        }
        let text = m.render();
        assert!(!text.contains("A1") && !text.contains("C3"), "{text}");
        assert!(
            text.contains(
                "trainq_rpc_duration_seconds_count{code=\"16\",method=\"unknown\",service=\"unknown\"} 3"
            ),
            "{text}"
        );
    }

    #[test]
    fn exposure_gauges_show_auth_and_insecure_listening() {
        let m = Metrics::new();
        let text = m.render();
        assert!(text.contains("trainq_auth_enabled 0"), "{text}");
        m.exposure(false, true);
        let text = m.render();
        assert!(text.contains("trainq_insecure_listen 1"), "{text}");
        m.exposure(true, false);
        let text = m.render();
        assert!(text.contains("trainq_auth_enabled 1"), "{text}");
        assert!(text.contains("trainq_insecure_listen 0"), "{text}");
    }

    #[test]
    fn counters_show_up_in_the_text_format() {
        let m = Metrics::new();
        m.claimed(Duration::from_millis(30));
        m.attempt_ended("queued", "failed");
        m.attempt_ended("failed", "lease_expired");
        m.lease_expired();
        m.rpc_done(
            "/trainq.v1.JobService/GetJob",
            "5",
            Duration::from_millis(2),
        );
        let text = m.render();
        assert!(
            text.contains("trainq_dispatch_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("trainq_dispatch_latency_seconds_bucket{le=\"0.05\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trainq_dispatch_latency_seconds_bucket{le=\"0.025\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("trainq_retries_total{cause=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("trainq_retries_total{cause=\"lease_expired\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("trainq_jobs_finished_total{state=\"failed\"} 1"),
            "{text}"
        );
        assert!(text.contains("trainq_lease_expiries_total 1"), "{text}");
        assert!(text.contains("trainq_jobs{state=\"waiting\"} 0"), "{text}");
        assert!(
            text.contains(
                "trainq_rpc_duration_seconds_count{code=\"5\",method=\"GetJob\",service=\"trainq.v1.JobService\"} 1"
            ),
            "{text}"
        );
    }
}
