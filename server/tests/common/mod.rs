//! What the in-process service tests (`service.rs`, `auth.rs`) share: where Postgres and Redis
//! are, a database name and Redis prefix per test that are removed when the test ends, and
//! waiting until a server serves. Each test binary uses a part of it.
#![allow(dead_code)]

use std::time::Duration;

use server::dispatch::Dispatcher;
use sqlx::{Connection as _, PgConnection};
use tonic::transport::Channel;
use uuid::Uuid;

/// How long a test waits for anything that should be quick.
pub const WAIT: Duration = Duration::from_secs(10);

/// The Postgres server the tests create their databases on (any database on it).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must name a Postgres server for the service tests")
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A database name and a Redis prefix of one test's own; dropping it drops the database (which
/// the server under test creates) and deletes the prefix's queue and alive marker, whether the
/// test passed or failed.
pub struct Cleanup {
    pub db_name: String,
    pub redis_prefix: String,
}

impl Cleanup {
    pub fn new() -> Self {
        Self {
            db_name: format!("trainq_test_{}", Uuid::new_v4().simple()),
            redis_prefix: format!("trainq-test:{}:", Uuid::new_v4()),
        }
    }

    /// The URL of the test's database on the [`admin_url`] server.
    pub fn db_url(&self) -> String {
        let admin = admin_url();
        let base = admin.split('?').next().unwrap_or(&admin);
        let (server_root, _) = base
            .rsplit_once('/')
            .expect("DATABASE_URL names a database");
        format!("{server_root}/{}", self.db_name)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (db_name, prefix) = (self.db_name.clone(), self.redis_prefix.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a fresh one.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut admin = PgConnection::connect(&admin_url()).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await?;
                let queue = Dispatcher::new(&redis_url(), &prefix)?;
                let _ = queue.delete_queue().await;
                let _ = queue.forget_alive().await;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
            eprintln!(
                "could not clean up test database {}: {cleaned:?}",
                self.db_name
            );
        }
    }
}

/// Polls gRPC health (which needs no token) until the server answers: it serves only after
/// creating and migrating its database.
pub async fn wait_until_serving(channel: Channel) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let req = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        match health.check(req).await {
            Ok(_) => return,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "server did not start serving: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
