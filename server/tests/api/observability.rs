//! Observability: gRPC health and reflection (v1 and v1alpha), and the Prometheus endpoint's
//! jobs by state, dispatch latency, retries, lease expiries and RPC durations.
//!
//! Must not scrape anything but the test server's own metrics address.

use std::time::Duration;

use proto::v1;
use tests::prometheus_sample as sample;
use tests::{http_get, redis_url};
use tokio_stream::StreamExt as _;

use crate::helpers::{eventually, get, submit, valid_spec, TestServer};

#[tokio::test]
async fn health_reports_serving_and_reflection_lists_the_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1 as r1, v1alpha as r1a};
    let server = TestServer::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    for service in ["", "trainq.v1.JobService", "trainq.v1.WorkerService"] {
        let req = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let status = health
            .check(req)
            .await
            .expect("health")
            .into_inner()
            .status();
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }

    let mut v1 = r1::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let req = r1::ServerReflectionRequest {
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
        ..Default::default()
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("v1")
        .into_inner();
    let resp = stream.next().await.expect("one response").expect("ok");
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message_response
    else {
        panic!("unexpected response {resp:?}")
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "trainq.v1.JobService",
        "trainq.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    let mut v1alpha =
        r1a::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let req = r1a::ServerReflectionRequest {
        message_request: Some(
            r1a::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
        ..Default::default()
    };
    let mut stream = v1alpha
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .expect("v1alpha")
        .into_inner();
    assert!(stream.next().await.expect("one response").is_ok());
    server.stop().await;
}

#[tokio::test]
async fn the_metrics_endpoint_counts_jobs_by_state_dispatch_latency_retries_and_rpcs() {
    let server = TestServer::start().await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let first = submit(&mut jobs, valid_spec()).await;
    let _second = submit(&mut jobs, valid_spec()).await;
    let (status, text) = http_get(&server.metrics_addr, "/metrics")
        .await
        .expect("the metrics endpoint answers");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&text, "trainq_jobs{state=\"queued\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_jobs{state=\"running\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_queue_depth{queue=\"default\"}"),
        Some(2.0),
        "{text}"
    );
    let oldest = sample(
        &text,
        "trainq_queue_oldest_job_age_seconds{queue=\"default\"}",
    );
    assert!(oldest.is_some_and(|s| s >= 0.0), "{text}");
    assert_eq!(sample(&text, "trainq_store_up"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "trainq_redis_up"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "trainq_dispatch_latency_seconds_count"),
        Some(0.0),
        "{text}"
    );

    // A claim observes how long the job waited; a retryable failure is a retry.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let lease = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: first.clone(),
            worker_id: "w".into(),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner()
        .lease;
    workers
        .fail_job(v1::FailJobRequest {
            lease,
            reason: "nccl timeout".into(),
            permanent: false,
        })
        .await
        .expect("fail");
    let _ = jobs
        .get_job(v1::GetJobRequest {
            job_id: "not-a-uuid".into(),
        })
        .await
        .expect_err("invalid id");
    let (_, text) = http_get(&server.metrics_addr, "/metrics")
        .await
        .expect("the metrics endpoint answers");
    assert_eq!(
        sample(&text, "trainq_dispatch_latency_seconds_count"),
        Some(1.0),
        "{text}"
    );
    let waited = sample(&text, "trainq_dispatch_latency_seconds_sum").expect("a sum");
    assert!((0.1..10.0).contains(&waited), "waited {waited} s: {text}");
    assert_eq!(
        sample(&text, "trainq_dispatch_latency_seconds_bucket{le=\"0.1\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_retries_total{cause=\"failed\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_jobs{state=\"queued\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "trainq_rpc_duration_seconds_count{code=\"0\",method=\"SubmitJob\",service=\"trainq.v1.JobService\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "trainq_rpc_duration_seconds_count{code=\"3\",method=\"GetJob\",service=\"trainq.v1.JobService\"}"
        ),
        Some(1.0),
        "{text}"
    );
    let (status, _) = http_get(&server.metrics_addr, "/nothing-here")
        .await
        .expect("the metrics endpoint answers");
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn a_lease_expiry_is_counted_and_the_job_retried() {
    let server = TestServer::start_with(&redis_url(), &["--lease-timeout-ms", "300"]).await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let claimed = workers
        .claim_job(v1::ClaimJobRequest {
            job_id: id.clone(),
            worker_id: "silent".into(),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(claimed.claimed);
    eventually("the reaper takes the silent worker's job", || async {
        get(&mut jobs.clone(), &id).await.state() == v1::JobState::Queued
    })
    .await;
    let (_, text) = http_get(&server.metrics_addr, "/metrics")
        .await
        .expect("the metrics endpoint answers");
    assert_eq!(
        sample(&text, "trainq_lease_expiries_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "trainq_retries_total{cause=\"lease_expired\"}"),
        Some(1.0),
        "{text}"
    );
    server.stop().await;
}
