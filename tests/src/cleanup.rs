//! A database name and a Redis key prefix of one test's own, on a given Postgres and Redis
//! server, and their removal when the test ends, whether it passed or failed: the database is
//! dropped (`WITH (FORCE)`) and every key under the prefix deleted.
//!
//! Must not create the database: the coordinator under test does (it creates and migrates it at
//! start), so what a test sees is what a deployment sees.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection};

use crate::env;

/// How long the clean-up of one test may take before it is given up on.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);

/// One test's database name and Redis prefix; dropping it removes both.
#[derive(Debug)]
pub struct Cleanup {
    /// `trainq_test_<32 hex digits>`.
    pub db_name: String,
    /// `trainq-test:<32 hex digits>:`.
    pub redis_prefix: String,
    /// A database on the Postgres server that holds the test's database (used to drop it).
    admin_url: String,
    /// The Redis server the test's keys live on.
    redis_url: String,
}

impl Cleanup {
    /// Names on the machine's test services ([`env::database_url`], [`env::redis_url`]).
    pub fn new() -> Self {
        Self::on(env::database_url(), env::redis_url())
    }

    /// Names on the Postgres server of `postgres_url` (a URL with or without a database) and the
    /// Redis server `redis_url`, for example the private ones of [`crate::services`].
    pub fn on(postgres_url: String, redis_url: String) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            db_name: format!("trainq_test_{id}"),
            redis_prefix: format!("trainq-test:{id}:"),
            admin_url: env::database_on(&postgres_url, "postgres"),
            redis_url,
        }
    }

    /// The URL of the test's database.
    pub fn database_url(&self) -> String {
        env::database_on(&self.admin_url, &self.db_name)
    }

    /// The Postgres server holding the test's database, as a URL without a database.
    pub fn postgres_server(&self) -> &str {
        env::server_of(&self.admin_url)
    }

    /// The Redis server the test's keys live on.
    pub fn redis_url(&self) -> &str {
        &self.redis_url
    }

    /// Drops the database and deletes the prefix's keys; each is tried whether or not the other
    /// worked.
    async fn remove(
        admin_url: &str,
        redis_url: &str,
        db: &str,
        prefix: &str,
    ) -> anyhow::Result<()> {
        let database = Self::drop_database(admin_url, db).await;
        let keys = Self::delete_keys(redis_url, prefix).await;
        match (database, keys) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) => Err(e.context("dropping the database")),
            (Ok(()), Err(e)) => Err(e.context("deleting the redis keys")),
            (Err(d), Err(k)) => Err(anyhow::anyhow!(
                "dropping the database: {d:#}; deleting the redis keys: {k:#}"
            )),
        }
    }

    async fn drop_database(admin_url: &str, db: &str) -> anyhow::Result<()> {
        let mut admin = PgConnection::connect(admin_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        let _ = admin.close().await;
        Ok(())
    }

    async fn delete_keys(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
        let client = redis::Client::open(redis_url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }
}

impl Default for Cleanup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (admin, redis) = (self.admin_url.clone(), self.redis_url.clone());
        let (db, prefix) = (self.db_name.clone(), self.redis_prefix.clone());
        // Drop may run inside a test's runtime, which cannot be blocked on: use a fresh one on a
        // thread of its own.
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                tokio::time::timeout(CLEANUP_TIMEOUT, Self::remove(&admin, &redis, &db, &prefix))
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out after {CLEANUP_TIMEOUT:?}"))?
            })
        })
        .join();
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!(
                "could not clean up test database {} and redis prefix {}: {e:#}",
                self.db_name, self.redis_prefix
            ),
            Err(_) => eprintln!("the clean-up of test database {} panicked", self.db_name),
        }
    }
}
