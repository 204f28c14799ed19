//! What trainq's binaries share on the client side of the coordinator, and around it.
//!
//! - [`connect`]: an endpoint from an address (`http://`, or `https://` trusting a CA file or
//!   the webpki roots, rustls with ring, TCP_NODELAY), and the bearer-token interceptor.
//! - [`retry`]: the one retry policy (exponential, jittered, capped) as `backon` builders.
//! - [`shutdown`]: SIGINT/SIGTERM into a `CancellationToken`.
//! - [`logging`]: tracing set-up, text or JSON lines, filtered by `RUST_LOG`.
//!
//! Must not depend on tch or sqlx (the CLI and the coordinator link this crate), and must not
//! know any service's messages: it builds channels and policies, callers make the calls.

pub mod connect;
pub mod logging;
pub mod retry;
pub mod shutdown;
