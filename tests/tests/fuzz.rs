//! The RPC fuzzer against a real coordinator (`tests::fuzz`): a bounded run in the test suite.
//! `TRAINQ_FUZZ_REQUESTS` sets the count (default 1,500) and `TRAINQ_FUZZ_SEED` the seed; the
//! longer run for a closing note is `cargo run -p tests --bin trainq-fuzz -- --requests 20000`.

use tests::{fuzz, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_to_every_method_never_get_internal_or_unknown_and_leave_the_database_sound(
) {
    let count: u64 = std::env::var("TRAINQ_FUZZ_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = std::env::var("TRAINQ_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(17);
    let env = TestEnv::new();
    let mut coordinator = env.start_coordinator(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(coordinator.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let fixture = fuzz::Fixture::make(channel.clone())
        .await
        .expect("making the fixture jobs");
    let report = fuzz::run(channel, &fixture, count, seed).await;
    println!("{}", report.table());
    assert_eq!(report.sent, count, "{:?}", report.failures);
    assert_eq!(
        report.by_method.len(),
        fuzz::methods().len(),
        "every method was called: {:?}",
        report.by_method
    );
    assert!(
        report.failures.is_empty(),
        "{} calls were answered INTERNAL/UNKNOWN or not at all (seed {seed}):\n{}\n--- log ---\n{}",
        report.failures.len(),
        report.failures.join("\n"),
        coordinator.proc.log()
    );
    assert!(
        coordinator.proc.is_running(),
        "the coordinator died:\n{}",
        coordinator.proc.log()
    );
    let log = coordinator.proc.log();
    assert!(!log.contains("panicked"), "a handler panicked:\n{log}");
    let pool = env.pool().await;
    let broken = fuzz::check_invariants(&pool, &env.artifacts_dir()).await;
    assert!(broken.is_empty(), "invariants broken: {broken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_does_not_decode_is_invalid_argument_not_internal() {
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(coordinator.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    // GetJobRequest.job_id (field 1, a string) sent as a varint; then as invalid UTF-8; then cut.
    let cases: [(&str, Vec<u8>); 3] = [
        ("wrong wire type", vec![0x08, 0x01]),
        ("invalid UTF-8", vec![0x0a, 0x02, 0xff, 0xfe]),
        ("truncated", vec![0x0a, 0x10, b'a']),
    ];
    for (what, bytes) in cases {
        for path in [
            "trainq.v1.JobService/GetJob",
            "trainq.v1.WorkerService/Heartbeat",
        ] {
            let status = fuzz::call_raw(channel.clone(), path, bytes.clone())
                .await
                .expect_err(what);
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{path}, {what}: {status:?}"
            );
        }
    }
}
