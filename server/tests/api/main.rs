//! The coordinator's service tests, one test binary with a file per area (zero2prod's
//! `tests/api/` layout): `server::run` in-process on 127.0.0.1:0, each test with a database of
//! its own (created by the server, dropped at the end) and a Redis key prefix of its own, driven
//! through the generated tonic clients.
//!
//! Needs the test Postgres and Redis that the `tests` crate names (`TRAINQ_TEST_DATABASE_URL`,
//! `TRAINQ_TEST_REDIS_URL`; see its docs for the defaults). Must hold `mod` lines only: what the
//! areas share lives in `helpers.rs`.

mod artifacts;
mod auth;
mod dependencies;
mod dispatch;
mod errors;
mod helpers;
mod jobs;
mod metrics;
mod observability;
mod postgres;
mod s3;
mod shutdown;
mod summary;
mod sweeps;
mod watchers;
mod workers;
