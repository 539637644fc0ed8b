//! The systemd service lifecycle for Rust services.
//!
//! A long-running service embeds this crate to behave well under systemd (`Type=notify`), and
//! just as well under Kubernetes or a plain shell, where every notification is a no-op:
//!
//! * `READY=1` when the service says it is ready, `STATUS=` lines that never wait,
//!   `EXTEND_TIMEOUT_USEC=` for slow starts and stops ([`Lifecycle`]);
//! * `SIGHUP` → `RELOADING=1` + `MONOTONIC_USEC=`, the service's reload, `READY=1`;
//!   `SIGTERM` → `STOPPING=1` and a bounded graceful stop that no dropped future can lose, a
//!   stop during the start included ([`Service`], [`ShutdownToken`]);
//! * watchdog pings **sent only while every registered work loop makes progress**, with
//!   systemd's own tolerance and never before `READY=1`, so that a hung or dead loop gets the
//!   service restarted and a healthy one never does ([`watchdog`]);
//! * an atomic, versioned JSON heartbeat file for operators and probes ([`heartbeat`]);
//! * `tracing` to journald when `JOURNAL_STREAM` says stderr is the journal, plain stderr
//!   otherwise ([`logging`]);
//! * the same for services on plain threads, without an async runtime ([`blocking`]);
//! * socket-activated listeners ([`activation`]) and `$CREDENTIALS_DIRECTORY` ([`credentials`]).
//!
//! The protocol follows systemd's own `sd_notify(3)`, `sd_watchdog_enabled(3)`,
//! `sd_listen_fds(3)` and `sd-daemon.c`: `@abstract` notify sockets work, `WATCHDOG_USEC=0` and a
//! malformed `WATCHDOG_PID` are errors, and the process environment is read once into a
//! [`SystemdEnv`] and never changed.
//!
//! # Quick start
//!
//! ```no_run
//! use std::time::Duration;
//! use watchkeeper::{Service, SystemdEnv, logging};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let env = SystemdEnv::from_env();
//!     logging::init(&logging::LogConfig::from_rust_log("my-service"), &env)?;
//!     let service = Service::builder("my-service").env(env).build()?;
//!
//!     // Every work loop registers; the watchdog pings only while all of them tick.
//!     let progress = service.register_loop("poll");
//!     let stop = service.shutdown_token();
//!     service.spawn_named("poll", async move {
//!         let mut every = tokio::time::interval(Duration::from_millis(500));
//!         loop {
//!             tokio::select! {
//!                 () = stop.cancelled() => break,
//!                 _ = every.tick() => {}
//!             }
//!             // ... poll, do one unit of work ...
//!             progress.tick();
//!         }
//!     });
//!
//!     // After a SIGTERM during the start this sends nothing and returns Ok(Delivery::Stopping):
//!     // run() below then completes the stop, and the process exits 0.
//!     service.lifecycle().ready_with_status("polling").await?;
//!     // Serves SIGHUP reloads until SIGTERM, then waits for the spawned tasks (bounded).
//!     service.run(watchkeeper::service::no_reload).await?;
//!     Ok(())
//! }
//! ```
//!
//! # Testing
//!
//! The `watchkeeper-testkit` crate is a fake manager: it binds a real notify socket, records
//! what the service sent and checks it (ready within a deadline, ping cadence, no ping while a
//! loop is stalled, the protocol's order).
//!
//! # Platform specific behavior
//!
//! Linux only: the notify socket is an `AF_UNIX` datagram socket, possibly in the abstract
//! namespace. `vsock:` notify addresses (systemd 253+, VM guests) are recognised and reported
//! as unsupported.
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]
#![doc(test(attr(deny(warnings))))]

pub mod activation;
pub mod blocking;
pub mod credentials;
pub mod env;
pub mod fsutil;
pub mod heartbeat;
pub mod lifecycle;
pub mod logging;
pub mod notify;
pub mod service;
pub mod watchdog;

pub use env::{EnvError, NotifyAddr, SystemdEnv};
pub use lifecycle::{Lifecycle, LifecycleError, State};
pub use notify::{Delivery, Notification, Notifier, NotifyError};
pub use service::{
    Controller, ReloadError, Service, ServiceBuilder, ServiceError, ShutdownToken, StopReport,
    TaskFailure, TaskOutput,
};
pub use watchdog::{Idle, Progress, Verdict, Watchdog};
