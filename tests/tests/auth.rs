//! System test of bearer-token auth: the real coordinator with client and worker tokens, a real
//! worker with its token, and the real grpcurl with and without `authorization: Bearer`.

use std::time::{Duration, Instant};

use tests::{mnist_spec_json, training_lock, TestEnv};

const CLIENT_TOKEN: &str = "system-test-client-token";
const WORKER_TOKEN: &str = "system-test-worker-token";

// The training lock is a std mutex on purpose: it serialises training across tests, each of
// which has its own runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_on_a_job_submitted_with_the_client_token_is_trained_by_a_worker_with_its_token()
{
    let _guard = training_lock();
    let env = TestEnv::new();
    let coordinator = env
        .start_coordinator(&[
            "--client-tokens",
            CLIENT_TOKEN,
            "--worker-tokens",
            WORKER_TOKEN,
        ])
        .await;
    let worker = env.start_worker(&coordinator, "worker-auth", &["--token", WORKER_TOKEN]);

    // Without a token, or with the worker's, JobService refuses; listing services needs none.
    let spec = mnist_spec_json("mnist-auth", 1, 256, 256);
    let data = format!(r#"{{"spec":{spec}}}"#);
    let refused = coordinator.grpcurl(Some(&data), &["trainq.v1.JobService/SubmitJob"]);
    assert!(!refused.success, "submitted without a token: {refused:?}");
    assert!(refused.stderr.contains("Unauthenticated"), "{refused:?}");
    let denied = coordinator.grpcurl_with_token(
        Some(WORKER_TOKEN),
        Some(&data),
        &["trainq.v1.JobService/SubmitJob"],
    );
    assert!(denied.stderr.contains("PermissionDenied"), "{denied:?}");
    let listed = coordinator.grpcurl(None, &["list"]);
    assert!(listed.stdout.contains("trainq.v1.JobService"), "{listed:?}");

    let submitted = coordinator
        .grpcurl_with_token(
            Some(CLIENT_TOKEN),
            Some(&data),
            &["trainq.v1.JobService/SubmitJob"],
        )
        .json();
    let job_id = submitted["jobId"].as_str().expect("jobId").to_string();
    let get = format!(r#"{{"jobId":"{job_id}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(300);
    let state = loop {
        let job = coordinator
            .grpcurl_with_token(
                Some(CLIENT_TOKEN),
                Some(&get),
                &["trainq.v1.JobService/GetJob"],
            )
            .json();
        let state = job["state"].as_str().unwrap_or_default().to_string();
        if matches!(
            state.as_str(),
            "JOB_STATE_SUCCEEDED" | "JOB_STATE_FAILED" | "JOB_STATE_CANCELLED"
        ) {
            break state;
        }
        assert!(
            Instant::now() < deadline,
            "job still {state} after 300 s; worker log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        state,
        "JOB_STATE_SUCCEEDED",
        "worker log:\n{}",
        worker.log()
    );

    for log in [coordinator.proc.log(), worker.log()] {
        assert!(
            !log.contains(CLIENT_TOKEN) && !log.contains(WORKER_TOKEN),
            "a token leaked into a log:\n{log}"
        );
    }
    assert!(
        coordinator
            .proc
            .log()
            .contains("auth: on (1 client, 1 worker tokens)"),
        "{}",
        coordinator.proc.log()
    );
}
