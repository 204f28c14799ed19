//! Postgres outages: a server waits for an unreachable Postgres (and still stops on request),
//! gives up after `--db-wait-ms`, and answers UNAVAILABLE quickly while Postgres is down (played
//! by [`PgProxy`], a TCP proxy that can be cut), working again once it is back.
//!
//! Must not stop or restart the shared Postgres: only the proxy in front of it is cut.

use std::time::Duration;

use clap::Parser as _;
use proto::v1;
use server::Config;
use tests::{database_url, redis_url, WAIT};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

use crate::helpers::{claim, eventually, submit, valid_spec, TestServer};

/// A TCP proxy in front of the test's Postgres that can be cut (every connection dropped, new
/// ones closed at once) and restored, to play a Postgres outage without touching the shared
/// server.
struct PgProxy {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (up, conns) = (up.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection closes at once
                    }
                    let conn = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    conns.lock().expect("lock").push(conn);
                }
            })
        };
        Self {
            addr,
            up,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for conn in self.conns.lock().expect("lock").drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A configuration whose Postgres is unreachable (port 1), with no metrics endpoint, artifacts
/// in `artifacts`, and `extra` flags.
fn unreachable_postgres_config(artifacts: &tempfile::TempDir, extra: &[&str]) -> Config {
    let artifacts_url = format!("file://{}", artifacts.path().display());
    let mut args = vec![
        "trainq-server",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/trainq",
        "--metrics-listen",
        "off",
        "--http-listen",
        "off",
    ];
    args.extend_from_slice(extra);
    args.extend(["--artifacts", &artifacts_url]);
    Config::try_parse_from(args).expect("valid flags")
}

#[tokio::test]
async fn a_server_waits_for_an_unreachable_postgres_instead_of_exiting_and_still_stops_on_request()
{
    let artifacts = tempfile::tempdir().expect("artifact dir");
    let config = unreachable_postgres_config(&artifacts, &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(config, listener, async {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !task.is_finished(),
        "still waiting for postgres, not crashed"
    );
    let _ = stop.send(());
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("stops in time")
        .expect("no panic");
    result.expect("a shutdown while waiting is a clean exit");
}

#[tokio::test]
async fn calls_answer_unavailable_quickly_while_postgres_is_down_and_work_again_when_it_is_back() {
    let admin = database_url();
    assert!(
        admin.contains('@'),
        "TRAINQ_TEST_DATABASE_URL has user@host: {admin}"
    );
    let host_port = tests::env::host_port_of(&admin);
    let target = tokio::net::lookup_host(host_port)
        .await
        .expect("postgres host resolves")
        .next()
        .expect("an address");
    let proxy = PgProxy::start(target).await;
    let proxied = format!("@{}/", proxy.addr);
    let server = TestServer::start_configured(
        &redis_url(),
        &["--db-acquire-timeout-ms", "500"],
        |config| {
            config.database_url =
                config
                    .database_url
                    .replacen(&format!("@{host_port}/"), &proxied, 1);
        },
    )
    .await;
    let (mut jobs, mut workers) = (server.jobs(), server.workers());
    let id = submit(&mut jobs, valid_spec()).await;
    let lease = claim(&mut workers, &id).await;

    proxy.cut();
    let started = tokio::time::Instant::now();
    let read = jobs
        .get_job(v1::GetJobRequest { job_id: id.clone() })
        .await
        .expect_err("postgres is down");
    let write = jobs
        .submit_job(v1::SubmitJobRequest {
            spec: Some(valid_spec()),
            request_id: String::new(),
        })
        .await
        .expect_err("postgres is down");
    let beat = workers
        .heartbeat(v1::HeartbeatRequest {
            lease: Some(lease.clone()),
        })
        .await
        .expect_err("postgres is down");
    let took = started.elapsed();
    assert_eq!(
        (read.code(), write.code(), beat.code()),
        (Code::Unavailable, Code::Unavailable, Code::Unavailable),
        "{read:?} {write:?} {beat:?}"
    );
    assert!(took < Duration::from_secs(5), "failed fast: {took:?}");

    proxy.restore();
    eventually("calls work again once postgres is back", || {
        let (mut jobs, id) = (jobs.clone(), id.clone());
        async move { jobs.get_job(v1::GetJobRequest { job_id: id }).await.is_ok() }
    })
    .await;
    let beat = workers
        .heartbeat(v1::HeartbeatRequest { lease: Some(lease) })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(beat.keep_running, "the lease survived the outage");
    server.stop().await;
}

#[tokio::test]
async fn a_server_gives_up_on_an_unreachable_postgres_after_db_wait_ms_with_a_clear_error() {
    let artifacts = tempfile::tempdir().expect("artifact dir");
    let config = unreachable_postgres_config(&artifacts, &["--db-wait-ms", "600"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let result = tokio::time::timeout(
        WAIT,
        server::run(config, listener, std::future::pending::<()>()),
    )
    .await
    .expect("gives up in time");
    let message = format!("{:#}", result.expect_err("an error, not a clean exit"));
    assert!(
        message.contains("postgres was not reachable within --db-wait-ms (600 ms)"),
        "{message}"
    );
}
