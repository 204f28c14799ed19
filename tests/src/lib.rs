//! The one test-support crate of trainq: the harness of the black-box system tests
//! (`tests/tests/*.rs`, which start the real `trainq-server` and `trainq-worker` binaries, built
//! by `cargo build --workspace --bins`, which scripts/test.sh does first) and of the coordinator's
//! in-process service tests (`server/tests/api/`, a dev-dependency of `server`; the client
//! crate and the CLI use its [`tls`] certificate in their unit tests). It is the one
//! place that knows where the test Postgres and Redis are, gives each test a database and Redis
//! key prefix of its own and removes them afterwards, waits for a coordinator to serve, holds the
//! training slot, finds the binaries, grpcurl and moto, and drives headless Chromium for the web
//! UI's browser tests ([`browser`]).
//!
//! Environment (each optional, with its default):
//!
//! | variable                   | what                                                         | default                                        |
//! |----------------------------|--------------------------------------------------------------|------------------------------------------------|
//! | `TRAINQ_TEST_DATABASE_URL` | a database on the Postgres server the tests create theirs on | `postgres://postgres@127.0.0.1:5432/postgres`  |
//! | `TRAINQ_TEST_REDIS_URL`    | the Redis server (each test under its own key prefix)        | `redis://127.0.0.1:6379`                       |
//! | `TRAINQ_TEST_DATA_DIR`     | a folder holding `mnist/` (real MNIST)                       | `../shared/data`                               |
//! | `TRAINQ_GRPCURL`           | the grpcurl binary                                           | `.tools/grpcurl`, then the PATH                |
//! | `TRAINQ_MOTO_SERVER`       | moto's S3 server                                             | `.tools/moto_server`, then the PATH            |
//! | `TRAINQ_PG_BIN`            | the folder of `initdb` and `pg_ctl` (private Postgres)       | the PATH, then `/usr/lib/postgresql/*/bin`     |
//! | `TRAINQ_REDIS_SERVER`      | the `redis-server` binary (private Redis)                    | the PATH                                       |
//! | `TRAINQ_CHROMEDRIVER`      | chromedriver (browser tests)                                 | the PATH                                       |
//! | `TRAINQ_CHROMIUM`          | the Chromium binary chromedriver starts (browser tests)      | `chromium`, then `chromium-browser` (the PATH) |
//!
//! scripts/test.sh passes the first two on as `DATABASE_URL` and `REDIS_URL` to the tests that
//! read those (`#[sqlx::test]` store tests, the dispatcher's unit tests).
//!
//! Anything a test needs that is missing (a binary, grpcurl, the MNIST files) is a loud failure
//! naming the fix, never a silent skip. Must not link libtorch (invariant 6), must not depend on
//! `server`, `client` or `cli` (their tests depend on this crate), and must never FLUSHALL or restart the
//! machine's shared services (the chaos suite breaks private ones, [`services`]).

pub mod bench;
pub mod browser;
mod cleanup;
pub mod compose;
mod coordinator;
pub mod env;
pub mod fuzz;
mod health;
mod helpers;
pub mod loadgen;
mod locate;
pub mod logcapture;
mod proc;
pub mod proxy;
pub mod services;
mod slot;
pub mod tls;

pub use cleanup::Cleanup;
pub use coordinator::{Coordinator, GrpcurlOutput, TestEnv};
pub use env::{database_url, postgres_server_url, redis_url};
pub use health::{wait_for_health, wait_until_serving, WAIT};
pub use helpers::{
    all_points, expect_exit, http_get, latest, mnist_spec_json, prometheus_sample, submit, trainq,
    wait_terminal,
};
pub use locate::{
    binary, data_dir_with_cifar, grpcurl, kubectl, kubernetes_validate, moto_server,
    shared_data_dir, workspace_root,
};
pub use proc::{free_port, Proc};
pub use slot::{training_lock, TrainingSlot};
