//! What each command does, one module per command group: the glue between the parsed command
//! line ([`crate::args`]) and the coordinator's JobService, printing through [`crate::output`].
//!
//! The pure parts (tables, progress, report text and statistics) live outside: these modules
//! fetch, write files and choose exit codes, and must not use one another except for the shared
//! artifact download ([`artifacts::download`]).

pub mod artifacts;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod report;
pub mod sweeps;
pub mod watch;
