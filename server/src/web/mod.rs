//! The web UI, on its own HTTP port (`--http-listen`): server-rendered pages of runs, one run
//! (with live curves), sweeps and workers.
//!
//! Every page is built from the same `JobService` handlers the gRPC API serves (called in
//! process, so validation, store queries, downsampling and the sweep statistics are one code
//! path), rendered by maud (which escapes every interpolated value), and works without
//! JavaScript except for the charts. Live points arrive over server-sent events from the
//! WatchJob loop. The only vendored front-end code is uPlot (`static/`, with its licence).
//!
//! - [`session`]: login with a client token, the signed session cookie and the CSRF checks.
//! - [`pages`]: the page handlers and their query parameters.
//! - [`views`]: the HTML.
//! - [`live`]: the server-sent event stream of one run.
//! - [`assets`]: the embedded static files.
//!
//! Must not write SQL or touch Redis: it goes through [`crate::api`].

mod assets;
mod error;
mod live;
mod pages;
mod session;
mod views;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tonic::Request;

use crate::api::{AppState, JobApi};
use crate::auth::Tokens;
use crate::shutdown::Shutdown;

pub use error::WebError;

/// What every web handler shares.
#[derive(Clone)]
pub struct Web {
    api: JobApi,
    state: Arc<AppState>,
    tokens: Arc<Tokens>,
}

impl Web {
    /// A gRPC request as the handlers receive it from the network (without metadata: the UI's
    /// session check already stood in for the token check).
    fn req<T>(message: T) -> Request<T> {
        Request::new(message)
    }
}

/// The UI's routes. Everything but `/login` and `/static/` needs a session when client tokens
/// are configured.
pub fn router(state: Arc<AppState>, tokens: Arc<Tokens>) -> Router {
    let web = Web {
        api: JobApi::new(state.clone()),
        state,
        tokens,
    };
    Router::new()
        .route("/", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/events", get(live::events))
        .route("/runs/{id}/cancel", post(pages::cancel))
        .route("/artifacts/{id}", get(pages::artifact))
        .route("/sweeps", get(pages::sweeps))
        .route("/sweeps/{id}", get(pages::sweep))
        .route("/compare", get(pages::compare))
        .route("/workers", get(pages::workers))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/static/{file}", get(assets::file))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            session::guard,
        ))
        .layer(axum::middleware::from_fn(server_timing))
        .with_state(web)
}

/// `Server-Timing: app;dur=<ms>` on every answer: the time from the request to the response's
/// head (a page's whole rendering; for an event stream only its start), so the browser's
/// developer tools and the UI benchmark see the server's own share.
async fn server_timing(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let start = std::time::Instant::now();
    let mut response = next.run(request).await;
    let dur = start.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("app;dur={dur:.3}")) {
        response.headers_mut().insert("server-timing", v);
    }
    response
}

/// Serves the UI on `listener` until the signal fires. Open event streams end on the same
/// signal (the WatchJob loop stops at shutdown), so the graceful shutdown does not wait for
/// them.
pub async fn serve(listener: TcpListener, app: Router, mut signal: Shutdown) -> anyhow::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { signal.wait().await })
        .await?;
    Ok(())
}
