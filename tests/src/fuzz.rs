//! The RPC fuzzer: hostile requests for every method of both services, built from the served
//! descriptor set, sent to a real coordinator over its real gRPC port.
//!
//! For each call it picks a method (round robin, so every method is covered), starts from a valid
//! seed request for it (typed, with ids of real jobs in every state, real leases, a sweep and an
//! artifact made beforehand by [`Fixture::make`]), applies up to three mutations through
//! `prost-reflect`'s dynamic messages (strings with U+0000, past every length limit, ids in the
//! wrong form or of jobs in the wrong state; integers at 0, limits and maxima; NaN and
//! infinities; unknown enum values; huge repeated fields and maps; cleared sub-messages), and
//! sometimes mutates the encoded bytes (invalid UTF-8 in a string field, a field with the wrong
//! wire type, a truncated message, random bytes). Calls out of order (CompleteJob on a job never
//! claimed, FailJob after completion) come from the seeds' leases applied to jobs in every state.
//!
//! Pass: no INTERNAL or UNKNOWN status (a client's fault is never the server's), the process
//! alive, no panic in its log, and the database's invariants intact ([`check_invariants`]).
//! Must not touch the shared services beyond its own test database and Redis prefix.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use proto::{v1, JobState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

mod mutate;

use mutate::{mutate, mutate_bytes};

/// A codec that sends and receives encoded messages as they are, so any bytes can be sent.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// One method of the API as the descriptor set describes it.
#[derive(Debug, Clone)]
pub struct Method {
    /// `trainq.v1.JobService/SubmitJob`
    pub path: String,
    pub name: String,
    input: MessageDescriptor,
    client_streaming: bool,
    server_streaming: bool,
}

/// Every method of JobService and WorkerService, from the descriptor set the coordinator serves.
pub fn methods() -> Vec<Method> {
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
    let mut out = Vec::new();
    for service in ["trainq.v1.JobService", "trainq.v1.WorkerService"] {
        let s = pool
            .get_service_by_name(service)
            .unwrap_or_else(|| panic!("{service} is in the descriptor set"));
        for m in s.methods() {
            out.push(Method {
                path: format!("{service}/{}", m.name()),
                name: m.name().to_owned(),
                input: m.input(),
                client_streaming: m.is_client_streaming(),
                server_streaming: m.is_server_streaming(),
            });
        }
    }
    out
}

/// Ids and leases of real objects, made before fuzzing so that seeds name jobs in every state.
#[derive(Debug, Clone, Default)]
pub struct Fixture {
    /// (state name, job id) for waiting, queued, running, succeeded, failed and cancelled jobs.
    pub jobs: Vec<(String, String)>,
    /// Leases: the running job's real one, and made-up ones on jobs in every other state.
    pub leases: Vec<v1::JobLease>,
    pub sweeps: Vec<String>,
    pub artifacts: Vec<String>,
}

pub const WORKER_ID: &str = "fuzz-worker";

fn mnist_spec(name: &str) -> v1::JobSpec {
    serde_json::from_str(&crate::mnist_spec_json(name, 1, 64, 64)).expect("spec JSON")
}

impl Fixture {
    /// Submits, claims, completes, fails and cancels jobs so that every state exists, uploads
    /// one artifact and submits one small sweep.
    pub async fn make(channel: Channel) -> anyhow::Result<Fixture> {
        use v1::job_service_client::JobServiceClient;
        use v1::worker_service_client::WorkerServiceClient;
        let mut jobs = JobServiceClient::new(channel.clone());
        let mut workers = WorkerServiceClient::new(channel);
        let mut submit = async |name: &str, deps: Vec<String>| -> anyhow::Result<String> {
            let mut spec = mnist_spec(name);
            spec.depends_on = deps;
            Ok(jobs
                .submit_job(v1::SubmitJobRequest {
                    spec: Some(spec),
                    request_id: String::new(),
                })
                .await?
                .into_inner()
                .job_id)
        };
        let queued = submit("fuzz-queued", vec![]).await?;
        let waiting = submit("fuzz-waiting", vec![queued.clone()]).await?;
        let running = submit("fuzz-running", vec![]).await?;
        let succeeded = submit("fuzz-succeeded", vec![]).await?;
        let failed = submit("fuzz-failed", vec![]).await?;
        let cancelled = submit("fuzz-cancelled", vec![]).await?;
        let mut claim = async |id: &str| -> anyhow::Result<v1::JobLease> {
            let r = workers
                .claim_job(v1::ClaimJobRequest {
                    job_id: id.to_owned(),
                    worker_id: WORKER_ID.into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            anyhow::ensure!(r.claimed, "fixture job {id} was not claimed");
            r.lease
                .ok_or_else(|| anyhow::anyhow!("claim without a lease"))
        };
        let run_lease = claim(&running).await?;
        let done_lease = claim(&succeeded).await?;
        let fail_lease = claim(&failed).await?;
        workers
            .report_metrics(v1::ReportMetricsRequest {
                lease: Some(run_lease.clone()),
                points: (0..20)
                    .map(|s| v1::MetricPoint {
                        name: proto::metric::TRAIN_LOSS.into(),
                        step: s,
                        epoch: 0,
                        value: 1.0 / (s as f64 + 1.0),
                    })
                    .collect(),
            })
            .await?;
        let data = b"fuzz artifact".to_vec();
        let sha = {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(&data))
        };
        let chunks = vec![
            v1::UploadArtifactChunk {
                part: Some(v1::upload_artifact_chunk::Part::Header(
                    v1::UploadArtifactHeader {
                        lease: Some(run_lease.clone()),
                        kind: "checkpoint".into(),
                        name: "epoch-001.safetensors".into(),
                        epoch: 1,
                        size_bytes: data.len() as u64,
                        sha256: sha,
                        step: 1,
                    },
                )),
            },
            v1::UploadArtifactChunk {
                part: Some(v1::upload_artifact_chunk::Part::Data(data)),
            },
        ];
        let artifact = workers
            .upload_artifact(tokio_stream::iter(chunks))
            .await?
            .into_inner()
            .id;
        workers
            .complete_job(v1::CompleteJobRequest {
                lease: Some(done_lease.clone()),
                final_step: 1,
            })
            .await?;
        workers
            .fail_job(v1::FailJobRequest {
                lease: Some(fail_lease.clone()),
                reason: "fixture".into(),
                permanent: true,
            })
            .await?;
        jobs.cancel_job(v1::CancelJobRequest {
            job_id: cancelled.clone(),
            reason: "fixture".into(),
        })
        .await?;
        let sweep: v1::SweepSpec = serde_json::from_value(serde_json::json!({
            "name": "fuzz-sweep",
            "base": serde_json::from_str::<serde_json::Value>(&crate::mnist_spec_json("b", 1, 64, 64))?,
            "grid": [{"field": "training.learningRate", "values": [0.001, 0.01]}],
            "seeds": [1, 2],
        }))?;
        let sweep = jobs
            .submit_sweep(v1::SubmitSweepRequest {
                spec: Some(sweep),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .sweep_id;
        let all = [
            (JobState::Waiting, &waiting),
            (JobState::Queued, &queued),
            (JobState::Running, &running),
            (JobState::Succeeded, &succeeded),
            (JobState::Failed, &failed),
            (JobState::Cancelled, &cancelled),
        ];
        let mut leases = vec![run_lease, done_lease, fail_lease];
        for (_, id) in &all {
            leases.push(v1::JobLease {
                job_id: (*id).clone(),
                attempt: 1,
                worker_id: WORKER_ID.into(),
            });
        }
        Ok(Fixture {
            jobs: all
                .iter()
                .map(|(s, id)| (s.as_str().to_owned(), (*id).clone()))
                .collect(),
            leases,
            sweeps: vec![sweep],
            artifacts: vec![artifact],
        })
    }

    fn job(&self, rng: &mut StdRng) -> String {
        self.jobs[rng.random_range(0..self.jobs.len())].1.clone()
    }

    fn lease(&self, rng: &mut StdRng) -> v1::JobLease {
        self.leases[rng.random_range(0..self.leases.len())].clone()
    }
}

/// A valid request for `method`, naming objects of the fixture.
fn seed_request(method: &str, fx: &Fixture, rng: &mut StdRng) -> Vec<u8> {
    let job = fx.job(rng);
    let lease = Some(fx.lease(rng));
    let sweep = fx.sweeps[0].clone();
    let points = |n: u64| -> Vec<v1::MetricPoint> {
        (0..n)
            .map(|s| v1::MetricPoint {
                name: proto::metric::TEST_LOSS.into(),
                step: s,
                epoch: 1,
                value: 0.5,
            })
            .collect()
    };
    match method {
        "SubmitJob" => v1::SubmitJobRequest {
            spec: Some(mnist_spec("fuzzed")),
            request_id: String::new(),
        }
        .encode_to_vec(),
        "GetJob" | "WatchJob" => v1::GetJobRequest { job_id: job }.encode_to_vec(),
        "ListJobs" => v1::ListJobsRequest {
            states: vec![v1::JobState::Queued as i32],
            labels: [("suite".to_owned(), "system".to_owned())].into(),
            page_size: 5,
            page_token: String::new(),
            kinds: vec!["mnist_classifier".to_owned()],
            name_contains: "fuzz".to_owned(),
        }
        .encode_to_vec(),
        "CancelJob" => v1::CancelJobRequest {
            job_id: job,
            reason: "fuzz".into(),
        }
        .encode_to_vec(),
        "GetMetrics" => v1::GetMetricsRequest {
            job_id: job,
            names: vec![proto::metric::TRAIN_LOSS.into()],
            page_size: 10,
            page_token: String::new(),
            max_points: 100,
        }
        .encode_to_vec(),
        "ListArtifacts" => v1::ListArtifactsRequest {
            job_id: job,
            kind: "checkpoint".into(),
        }
        .encode_to_vec(),
        "DownloadArtifact" => v1::DownloadArtifactRequest {
            artifact_id: fx.artifacts[0].clone(),
            job_id: String::new(),
            kind: String::new(),
        }
        .encode_to_vec(),
        "SubmitSweep" => {
            let spec: v1::SweepSpec = serde_json::from_value(serde_json::json!({
                "name": "fuzzed-sweep",
                "base": serde_json::from_str::<serde_json::Value>(&crate::mnist_spec_json("b", 1, 64, 64))
                    .expect("spec JSON"),
                "grid": [{"field": "training.batchSize", "values": [32, 64]}],
                "seeds": [1],
            }))
            .expect("sweep JSON");
            v1::SubmitSweepRequest {
                spec: Some(spec),
                request_id: String::new(),
            }
            .encode_to_vec()
        }
        "GetSweep" | "WatchSweep" | "GetSweepSummary" | "CancelSweep" => v1::GetSweepRequest {
            sweep_id: sweep,
            ..Default::default()
        }
        .encode_to_vec(),
        "ListSweeps" => v1::ListSweepsRequest {
            page_size: 3,
            ..Default::default()
        }
        .encode_to_vec(),
        "ClaimJob" => v1::ClaimJobRequest {
            job_id: job,
            worker_id: WORKER_ID.into(),
            device_kind: ["", "cpu", "cuda"][rng.random_range(0..3)].into(),
            free_gpu_memory_mib: rng.random_bool(0.5).then(|| rng.random_range(0..100_000)),
        }
        .encode_to_vec(),
        "Heartbeat" => v1::HeartbeatRequest { lease }.encode_to_vec(),
        "ReportMetrics" => v1::ReportMetricsRequest {
            lease,
            points: points(rng.random_range(1..50)),
        }
        .encode_to_vec(),
        "CompleteJob" => v1::CompleteJobRequest {
            lease,
            final_step: 10,
        }
        .encode_to_vec(),
        "FailJob" => v1::FailJobRequest {
            lease,
            reason: "fuzz".into(),
            permanent: rng.random_bool(0.5),
        }
        .encode_to_vec(),
        "ReleaseJob" => v1::ReleaseJobRequest {
            lease,
            reason: "fuzz".into(),
        }
        .encode_to_vec(),
        "UploadArtifact" => v1::UploadArtifactChunk {
            part: Some(v1::upload_artifact_chunk::Part::Header(
                v1::UploadArtifactHeader {
                    lease,
                    kind: "samples".into(),
                    name: "grid.png".into(),
                    epoch: 1,
                    size_bytes: 4,
                    sha256: "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
                        .into(),
                    step: 2,
                },
            )),
        }
        .encode_to_vec(),
        "ListWorkers" => v1::ListWorkersRequest {
            include_lost: rng.random_bool(0.5),
        }
        .encode_to_vec(),
        "GetWorker" => v1::GetWorkerRequest {
            worker_id: WORKER_ID.into(),
        }
        .encode_to_vec(),
        "WorkerHeartbeat" => v1::WorkerHeartbeatRequest {
            worker_id: WORKER_ID.into(),
            host: "fuzz-host".into(),
            version: "0".into(),
            devices: vec![v1::WorkerDevice {
                name: "cpu".into(),
                ..Default::default()
            }],
            slots_total: 2,
            slots_busy: 1,
            queues: vec!["default".into()],
            instance_id: "fuzz".into(),
        }
        .encode_to_vec(),
        _ => Vec::new(),
    }
}

/// What a fuzz run saw.
#[derive(Debug, Default)]
pub struct Report {
    pub sent: u64,
    /// Status code name -> count ("Ok" for successes, "Timeout" for calls with no answer).
    pub codes: BTreeMap<String, u64>,
    /// Calls answered INTERNAL or UNKNOWN (or never answered), with what was sent.
    pub failures: Vec<String>,
    pub by_method: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl Report {
    pub fn table(&self) -> String {
        let mut s = format!(
            "requests sent: {} in {:.1} s ({:.0}/s)\n| status | count |\n|---|---:|\n",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
        );
        for (code, n) in &self.codes {
            s.push_str(&format!("| {code} | {n} |\n"));
        }
        s.push_str(&format!("methods covered: {}\n", self.by_method.len()));
        s
    }
}

fn record(report: &mut Report, method: &Method, result: Result<(), Status>, what: &str) {
    let code = match &result {
        Ok(()) => "Ok".to_owned(),
        Err(s) => format!("{:?}", s.code()),
    };
    *report.codes.entry(code).or_default() += 1;
    if let Err(s) = &result {
        if matches!(s.code(), Code::Internal | Code::Unknown) {
            report.failures.push(format!(
                "{}: {:?} {:?} after {what}",
                method.path,
                s.code(),
                s.message()
            ));
        }
    }
}

/// Sends `count` fuzzed requests round robin over every method; `seed` makes a run repeatable.
pub async fn run(channel: Channel, fx: &Fixture, count: u64, seed: u64) -> Report {
    let methods = methods();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut report = Report::default();
    let started = Instant::now();
    for i in 0..count {
        let method = &methods[(i as usize) % methods.len()];
        let mut msg = DynamicMessage::decode(
            method.input.clone(),
            &seed_request(&method.name, fx, &mut rng)[..],
        )
        .expect("a seed decodes as its method's input");
        let mutations = rng.random_range(0..=3);
        for _ in 0..mutations {
            mutate(&mut msg, &mut rng, fx, 0);
        }
        let mut bytes = msg.encode_to_vec();
        let raw = rng.random_bool(0.15);
        if raw {
            mutate_bytes(&mut bytes, &method.input, &mut rng);
        }
        let what = format!(
            "{mutations} field mutations{}",
            if raw { " and byte damage" } else { "" }
        );
        let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("/{}", method.path))
            .expect("a method path");
        if grpc.ready().await.is_err() {
            report
                .failures
                .push(format!("{}: the connection broke", method.path));
            break;
        }
        let call = async {
            if method.client_streaming {
                let mut chunks = vec![bytes.clone()];
                if rng.random_bool(0.5) {
                    chunks.push(
                        v1::UploadArtifactChunk {
                            part: Some(v1::upload_artifact_chunk::Part::Data(b"data".to_vec())),
                        }
                        .encode_to_vec(),
                    );
                }
                if rng.random_bool(0.2) {
                    chunks.push(bytes.clone());
                }
                grpc.client_streaming(tonic::Request::new(tokio_stream::iter(chunks)), path, Raw)
                    .await
                    .map(|_| ())
            } else if method.server_streaming {
                let mut stream = grpc
                    .server_streaming(tonic::Request::new(bytes), path, Raw)
                    .await?
                    .into_inner();
                // The first message (or error) says how the call was taken; watches go on forever.
                match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Ok(()),
                }
            } else {
                grpc.unary(tonic::Request::new(bytes), path, Raw)
                    .await
                    .map(|_| ())
            }
        };
        let result = match tokio::time::timeout(Duration::from_secs(15), call).await {
            Ok(r) => r,
            Err(_) => {
                *report.codes.entry("Timeout".into()).or_default() += 1;
                report
                    .failures
                    .push(format!("{}: no answer in 15 s after {what}", method.path));
                report.sent += 1;
                continue;
            }
        };
        record(&mut report, method, result, &what);
        *report.by_method.entry(method.path.clone()).or_default() += 1;
        report.sent += 1;
    }
    report.elapsed = started.elapsed();
    report
}

/// The database's invariants after any sequence of calls: each names what it found broken.
pub async fn check_invariants(pool: &sqlx::PgPool, artifacts_dir: &std::path::Path) -> Vec<String> {
    let checks: [(&str, &str); 7] = [
        (
            "running jobs without an open attempt of their current number",
            "SELECT count(*) FROM jobs j WHERE j.state = 'running' AND NOT EXISTS (
               SELECT 1 FROM job_attempts a WHERE a.job_id = j.id AND a.attempt = j.attempt
               AND a.ended_at IS NULL)",
        ),
        (
            "open attempts of jobs that are not running that attempt",
            "SELECT count(*) FROM job_attempts a JOIN jobs j ON j.id = a.job_id
             WHERE a.ended_at IS NULL AND (j.state <> 'running' OR j.attempt <> a.attempt)",
        ),
        (
            "jobs with more than one open attempt",
            "SELECT count(*) FROM (SELECT job_id FROM job_attempts WHERE ended_at IS NULL
             GROUP BY job_id HAVING count(*) > 1) x",
        ),
        (
            "attempts that overlap the next one",
            "SELECT count(*) FROM job_attempts a JOIN job_attempts b
               ON b.job_id = a.job_id AND b.attempt = a.attempt + 1
             WHERE a.ended_at IS NULL OR b.claimed_at < a.ended_at",
        ),
        (
            "jobs whose attempt counter disagrees with their attempt rows",
            "SELECT count(*) FROM jobs j WHERE j.attempt <>
               (SELECT count(*) FROM job_attempts a WHERE a.job_id = j.id)",
        ),
        (
            "finished jobs without finished_at, or unfinished ones with it",
            "SELECT count(*) FROM jobs WHERE (state IN ('succeeded', 'failed', 'cancelled'))
               <> (finished_at IS NOT NULL)",
        ),
        (
            "waiting jobs whose dependencies all succeeded",
            "SELECT count(*) FROM jobs j WHERE j.state = 'waiting' AND NOT EXISTS (
               SELECT 1 FROM job_dependencies d JOIN jobs p ON p.id = d.depends_on
               WHERE d.job_id = j.id AND p.state <> 'succeeded')",
        ),
    ];
    let mut broken = Vec::new();
    for (what, sql) in checks {
        match sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await {
            Ok(0) => {}
            Ok(n) => broken.push(format!("{n} {what}")),
            Err(e) => broken.push(format!("checking {what}: {e}")),
        }
    }
    // Orphaned artifact rows: rows whose object is not in the store.
    let uris: Vec<String> = sqlx::query_scalar("SELECT uri FROM artifacts")
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    let missing = uris
        .iter()
        .filter(|u| {
            let path = u.strip_prefix("file://").map(std::path::PathBuf::from);
            match path {
                Some(p) if p.is_absolute() => !p.exists(),
                Some(p) => !artifacts_dir.join(&p).exists() && !p.exists(),
                None => !artifacts_dir.join(u.as_str()).exists(),
            }
        })
        .count();
    if missing > 0 {
        broken.push(format!(
            "{missing} artifact rows whose object is missing: {uris:?}"
        ));
    }
    broken
}

/// Sends `bytes` as the request of the unary method `path` (`trainq.v1.JobService/GetJob`).
pub async fn call_raw(channel: Channel, path: &str, bytes: Vec<u8>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("/{path}"))
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    grpc.unary(tonic::Request::new(bytes), path, Raw)
        .await
        .map(tonic::Response::into_inner)
}
