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
//! * **Liveness of the accept side**: one registered loop, `http`, ticked by a middleware for
//!   every request it serves. An idle server serves no requests, so a probe task sends one
//!   request to the server itself (`GET /livez`) whenever no request came in for a quarter of
//!   the watchdog timeout: if accepting or serving hangs, the probe is not served, the loop
//!   stops ticking and the pings stop. The probe costs one wakeup and one request per quarter
//!   timeout, and none while real requests keep coming; without a watchdog there is no probe.
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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use watchkeeper::logging::{self, LogConfig};
use watchkeeper::watchdog::Verdict;
use watchkeeper::{Progress, Service, ShutdownToken, SystemdEnv, Watchdog, activation};

/// The name the listener is looked up by: `http`, or `http.socket` (systemd's name for the fd
/// of `http.socket` without `FileDescriptorName=`).
const FD_NAME: &str = "http";

/// How long the probe may take before it counts as not served (it then simply does not tick).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    watchdog: Watchdog,
}

/// What the middleware shares with the probe: the accept side's loop and a request counter.
struct Liveness {
    progress: Progress,
    served: AtomicU64,
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

    let liveness = Arc::new(Liveness {
        progress: service.register_loop("http"),
        served: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/health", get(health))
        .route("/livez", get(|| async { "alive\n" }))
        .with_state(AppState {
            watchdog: service.watchdog().clone(),
        })
        .layer(middleware::from_fn_with_state(liveness.clone(), tick));

    let stop = service.shutdown_token();
    service.spawn_named("http", async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    });
    if let Some(timeout) = service.watchdog().timeout() {
        let stop = service.shutdown_token();
        service.spawn_named("probe", probe_while_idle(liveness, addr, timeout / 4, stop));
    }

    service
        .lifecycle()
        .ready_with_status(&format!("listening on {addr} ({source})"))
        .await?;
    let report = service.run(watchkeeper::service::no_reload).await?;
    tracing::info!(?report, "stopped");
    Ok(())
}

/// Every request served proves that the accept side is alive.
async fn tick(State(live): State<Arc<Liveness>>, req: Request, next: Next) -> Response {
    live.progress.tick();
    live.served.fetch_add(1, Ordering::Relaxed);
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

/// While no request comes in, sends one to the server itself every `every`.
async fn probe_while_idle(
    live: Arc<Liveness>,
    addr: SocketAddr,
    every: Duration,
    stop: ShutdownToken,
) {
    let target = loopback(addr);
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = live.served.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        let served = live.served.load(Ordering::Relaxed);
        if served != seen {
            // Real requests proved it since the last look.
            seen = served;
            continue;
        }
        match tokio::time::timeout(PROBE_TIMEOUT, probe(target)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, %target, "liveness probe failed"),
            Err(_) => tracing::warn!(%target, "liveness probe not answered in time"),
        }
        seen = live.served.load(Ordering::Relaxed);
    }
}

/// The address to reach a listener on this host: an unspecified address becomes loopback.
fn loopback(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// `GET /livez` over a plain connection: enough HTTP/1.1 to need no client library.
async fn probe(target: SocketAddr) -> std::io::Result<()> {
    let mut conn = tokio::net::TcpStream::connect(target).await?;
    conn.write_all(b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).await?;
    if &head == b"HTTP/1.1 200" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "unexpected answer {:?}",
            String::from_utf8_lossy(&head)
        )))
    }
}
