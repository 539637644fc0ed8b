//! An HTTP service (axum) under systemd: the listener comes from socket activation or is bound
//! here, the accept side proves it is alive to the watchdog, `/health` answers from the
//! watchdog's view, and `SIGTERM` stops it gracefully through the library's shutdown token.
//!
//! ```text
//! cargo run --example 05_http_axum -- --listen 127.0.0.1:8080
//! curl -i http://127.0.0.1:8080/health
//! ```
//!
//! * **Listener**: the passed fd of `http.socket` (or one with `FileDescriptorName=http`) if
//!   systemd passed one, else `--listen` (default `127.0.0.1:8080`) is bound. `STATUS=` says
//!   where it listens and which it was.
//! * **Liveness of the accept side**: one registered loop, `http`. axum accepts through a
//!   listener wrapper whose `accept()` waits inside `Progress::idle`: an idle server waiting
//!   for connections counts as alive without a timer or a wakeup of its own, and every accepted
//!   connection and every request served (a middleware) is a tick. A server that stops coming
//!   back to `accept()`, or stops serving, stops ticking, and the pings stop.
//! * **`/health`**: `200 ok` while the watchdog would ping (`Watchdog::peek`), `503` naming the
//!   stalled loops otherwise. The request itself ticks `http` first, so a served `/health`
//!   never reports the accept side it went through as stalled.
//! * **Stop**: `axum::serve(..).with_graceful_shutdown(token.cancelled_owned())` stops
//!   accepting at `SIGTERM` and lets requests in flight finish, within the service's stop
//!   bound.
//!
//! Unit (socket activation optional):
//!
//! ```ini
//! # http.socket
//! [Socket]
//! ListenStream=127.0.0.1:8080
//!
//! # http.service
//! [Service]
//! Type=notify
//! ExecStart=/usr/local/bin/05_http_axum
//! WatchdogSec=10
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use watchkeeper::logging::{self, LogConfig};
use watchkeeper::watchdog::Verdict;
use watchkeeper::{Progress, Service, SystemdEnv, Watchdog, activation};

/// The name the listener is looked up by: `http`, or `http.socket` (systemd's name for the fd
/// of `http.socket` without `FileDescriptorName=`).
const FD_NAME: &str = "http";

#[derive(Clone)]
struct AppState {
    watchdog: Watchdog,
}

/// The listener axum serves from: waiting for a connection is idle time of the `http` loop,
/// each accepted connection a tick.
struct WatchedListener {
    inner: tokio::net::TcpListener,
    progress: Arc<Progress>,
}

impl axum::serve::Listener for WatchedListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // axum's own accept loop for TCP: it logs and retries failed accepts.
        let accept = axum::serve::Listener::accept(&mut self.inner);
        self.progress.idle(accept).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn parse_args() -> anyhow::Result<String> {
    let mut listen = "127.0.0.1:8080".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().context("--listen needs an address")?,
            other => anyhow::bail!("unknown argument {other:?} (expected --listen ADDR)"),
        }
    }
    Ok(listen)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = parse_args()?;
    let env = SystemdEnv::from_env();
    // SAFETY: first thing in main, before anything else could own fds 3 and up.
    let mut fds = unsafe { activation::take(&env) }?;
    logging::init(&LogConfig::from_rust_log("http-axum"), &env)?;
    let service = Service::builder("http-axum").env(env).build()?;

    let (listener, source) = fds.tcp_listener_or_bind(Some(FD_NAME), listen.as_str())?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %source, "listening");

    let progress = Arc::new(service.register_loop("http"));
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/health", get(health))
        .with_state(AppState {
            watchdog: service.watchdog().clone(),
        })
        .layer(middleware::from_fn_with_state(progress.clone(), tick));
    let listener = WatchedListener {
        inner: listener,
        progress,
    };

    let stop = service.shutdown_token();
    service.spawn_named("http", async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    });

    service
        .lifecycle()
        .ready_with_status(&format!("listening on {addr} ({source})"))
        .await?;
    let report = service.run(watchkeeper::service::no_reload).await?;
    tracing::info!(?report, "stopped");
    Ok(())
}

/// Every request served is progress (also on a kept-alive connection, which does not go
/// back to `accept()`).
async fn tick(State(progress): State<Arc<Progress>>, req: Request, next: Next) -> Response {
    progress.tick();
    next.run(req).await
}

/// `200 ok` while the watchdog would ping, `503` naming the stalled loops otherwise.
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    match state.watchdog.peek() {
        Verdict::Healthy => (StatusCode::OK, "ok\n".to_owned()),
        Verdict::Stalled(loops) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stalled: {}\n", loops.join(", ")),
        ),
    }
}
