//! trainq worker library: the binary in main.rs is a thin shell over these modules.
//!
//! - [`agent`]: the async side: pops job ids from Redis, claims them over gRPC, heartbeats, and
//!   forwards metrics and artifacts (and fetches a transfer's source checkpoint first); training
//!   itself runs on an executor thread.
//! - [`train`]: the training engine (tch), run on its own OS thread.
//! - [`data`]: data sets (MNIST, CIFAR-100, download and verification), kept on the training
//!   device.
//! - [`model`]: the seed's models with stable parameter names.
//!   Its tasks: `train::classifier`, `train::cvae` (the CIFAR-100 CVAE), and `train::transfer`
//!   (starting the CVAE from a trained MNIST classifier's conv layers).
//! - [`checkpoint`]: models as safetensors bytes; [`images`]:
//!   PNG image grids; [`optim`]: Adam, AdamW and SGD with a state that training states save.
//! - [`metrics`]: Prometheus metrics on `/metrics` (throughput, job ends, GPU memory).
//! - [`standalone`]: runs one spec with no coordinator; [`bench`]: throughput benchmark.
//!
//! Invariant: training never runs on the async runtime; a Tensor stays on the thread that made it.

pub mod agent;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dispatch;
pub mod executor;
pub mod images;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod shim;
pub mod standalone;
pub mod train;
