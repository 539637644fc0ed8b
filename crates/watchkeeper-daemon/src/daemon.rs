//! [`run`]: the daemon's start, its background tasks, reload and stop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use watchkeeper::activation::{self, ListenFds};
use watchkeeper::logging::{self, LogConfig};
use watchkeeper::{Delivery, Lifecycle, Progress, Service, State, SystemdEnv};
use watchkeeper_jobs::Stats;

use crate::config::Config;
use crate::listener::{self, SocketFile};
use crate::server::{self, Broker};
use crate::store::{SharedStore, Store, StoreError, now_ms};
use crate::{DaemonError, Options, error_chain};

/// The service's name: logs (`SYSLOG_IDENTIFIER=`) and the library's `Service`.
pub const NAME: &str = "watchkeeper-daemon";

/// Most finished jobs one maintenance round deletes (retention), so that no commit is long:
/// up to 1,000 a second.
const PRUNE_STEP: u64 = 500;

/// The shortest time between two maintenance rounds (sweep, retention, counts).
const MAINTENANCE_INTERVAL: Duration = Duration::from_millis(500);
/// How often the retention of finished jobs is applied while nothing else wakes the
/// maintenance.
const RETENTION_CHECK: Duration = Duration::from_secs(60);

/// `STATUS=` text for `stats`, e.g. `queued 3, claimed 1, completed 10, failed 0, denied 1,
/// quarantined 0`, with `note` (a failed reload) appended after `; `.
pub fn status_line(stats: &Stats, note: Option<&str>) -> String {
    let Stats {
        queued,
        claimed,
        completed,
        failed,
        denied,
        quarantined,
    } = stats;
    let mut line = format!(
        "queued {queued}, claimed {claimed}, completed {completed}, failed {failed}, denied {denied}, quarantined {quarantined}"
    );
    if let Some(note) = note {
        line.push_str("; ");
        line.push_str(note);
    }
    line
}

/// What start-up produced.
struct Started {
    listener: UnixListener,
    /// The bound socket file, removed at exit; `None` when socket-activated.
    socket_file: Option<SocketFile>,
    listening_on: String,
    store: SharedStore,
    config: Config,
    stats: Stats,
}

/// Runs the daemon until `SIGTERM` (or `SIGINT`) and a graceful stop.
///
/// Takes the socket-activation fds first, then sets up logging and the [`Service`], opens the
/// store (sweeping leases that expired while it was down) and the socket, and sends `READY=1`
/// with the queue counts. Returns once every connection has finished its last request.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let env = SystemdEnv::from_env();
    // SAFETY: this is the first thing the daemon does. Before it, `main` only parsed the
    // arguments and started the tokio runtime, which opens fds of its own but never uses or
    // closes inherited ones; nothing else in the process owns fds 3..3+LISTEN_FDS.
    let mut fds = unsafe { activation::take(&env) }.map_err(DaemonError::Activation)?;
    logging::init(&LogConfig::from_rust_log(NAME), &env).map_err(DaemonError::Logging)?;
    let service = Service::builder(NAME)
        .env(env)
        .build()
        .map_err(DaemonError::Service)?;
    let lifecycle = service.lifecycle();

    // A stop during the start is a clean stop: the start completes, `READY=1` is skipped
    // (`Delivery::Stopping`) and `service.run` below finishes the stop, so the daemon exits 0.
    let _ = lifecycle.status("starting: opening the job store");
    let started = match start(&opts, &mut fds).await {
        Ok(started) => started,
        Err(DaemonError::Config(e)) if !fds.is_empty() => {
            return serve_config_error(service, &mut fds, e).await;
        }
        Err(e) => {
            let _ = lifecycle.status(&format!("failed to start: {}", error_chain(&e)));
            return Err(e);
        }
    };
    drop(fds);
    let Started {
        listener,
        socket_file,
        listening_on,
        store,
        config,
        stats,
    } = started;

    let stop: CancellationToken = service.shutdown_token().into();
    let (config_tx, config_rx) = watch::channel(config.clone());
    let (counts_tx, counts_rx) = watch::channel(stats.clone());
    let (note_tx, note_rx) = watch::channel(None::<String>);

    let (nofile_before, nofile) = crate::raise_nofile_limit();
    let cap = crate::connection_cap(nofile);
    tracing::info!(
        nofile_before,
        nofile,
        connection_cap = cap,
        "open-file limit and connection cap"
    );
    let (conn_tx, conn_rx) = watch::channel(server::ConnectionStats::default());
    let broker = Arc::new(
        Broker::new(store.clone(), config_rx.clone(), opts.allow_uids.clone())
            .with_controller(service.controller())
            .with_connection_limits(cap, server::IDLE_TIMEOUT),
    );
    service.spawn(server::accept_loop_with_counts(
        listener,
        broker,
        stop.clone(),
        service.register_loop("accept"),
        Some(conn_tx),
    ));
    let store_for_status = store.clone();
    service.spawn(maintain(
        store,
        config_rx.clone(),
        counts_tx,
        stop.clone(),
        service.register_loop("store"),
        service.watchdog().timeout(),
    ));
    service.spawn(report_status(
        store_for_status,
        lifecycle.clone(),
        counts_rx.clone(),
        note_rx,
        conn_rx,
        config_rx,
        stop,
    ));

    let ready = lifecycle
        .ready_with_status(&status_line(&stats, None))
        .await
        .map_err(DaemonError::Ready)?;
    if ready == Delivery::Stopping {
        tracing::info!("asked to stop during the start; stopping");
    } else {
        tracing::info!(
        socket = %listening_on,
        lease_secs = config.lease_secs,
        max_attempts = config.max_attempts,
        allowed_uids = ?config.allowed_uids,
        extra_allowed_uids = ?opts.allow_uids,
        status_interval_secs = config.status_interval_secs,
            "ready; {}",
            status_line(&stats, None)
        );
    }

    let reloader = Reloader {
        path: opts.config.clone(),
        config: Arc::new(config_tx),
        note: Arc::new(note_tx),
        counts: counts_rx,
        lifecycle,
    };
    let result = service.run(|| reloader.clone().reload()).await;
    drop(socket_file);
    match result {
        Ok(report) => {
            tracing::info!(drained_in = ?report.drained_in, "stopped");
            Ok(())
        }
        Err(e) => Err(DaemonError::Service(e)),
    }
}

/// A socket-activated daemon whose configuration is broken.
///
/// Exiting at once (code 6) does not work under socket activation: the connection that
/// started the daemon is still queued on the socket, so systemd starts the service again at
/// once (`socket.c` re-triggers while the socket is readable), the start limit is hit within
/// a second (5 starts), the socket unit fails with `service-start-limit-hit` and closes its
/// socket, and clients then see `ENOENT`/`ECONNREFUSED` instead of the reason.
///
/// So the daemon starts, without a store: `READY=1` with `STATUS=configuration error: …`,
/// and every connection is answered `unavailable: configuration error: …` and closed, so
/// workers log the reason. A reload is refused (a restart applies a fixed file). On `SIGTERM`
/// the daemon exits 6 (`NOTCONFIGURED`), which `RestartPreventExitStatus=6` keeps from being
/// restarted, and the unit's result shows the failure.
async fn serve_config_error(
    service: Service,
    fds: &mut ListenFds,
    error: crate::config::ConfigError,
) -> Result<(), DaemonError> {
    let lifecycle = service.lifecycle();
    let why = error_chain(&error);
    let listener = match listener::from_activation(fds) {
        Ok(Some(listener)) => listener,
        Ok(None) => return Err(DaemonError::Config(error)),
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Err(DaemonError::Config(error));
        }
    };
    tracing::error!(
        "configuration error: {why}; socket-activated, so the daemon stays up and answers every \
         connection with the error (exiting would be re-triggered until the socket fails); \
         fix the file and restart the service"
    );
    let stop: CancellationToken = service.shutdown_token().into();
    service.spawn(server::config_error_loop(
        listener,
        why.clone(),
        stop,
        service.register_loop("accept"),
    ));
    let status = format!("configuration error: {why}; answering every connection with it");
    lifecycle
        .ready_with_status(&status)
        .await
        .map_err(DaemonError::Ready)?;
    let result = service
        .run(|| async {
            Err::<(), _>(
                "started with a configuration error: restart the service to apply a fixed file",
            )
        })
        .await;
    if let Err(e) = result {
        tracing::error!("{}", error_chain(&e));
    }
    Err(DaemonError::Config(error))
}

/// Opens the store and the socket.
async fn start(opts: &Options, fds: &mut ListenFds) -> Result<Started, DaemonError> {
    let config = match &opts.config {
        Some(path) => Config::load(path).map_err(DaemonError::Config)?,
        None => Config::default(),
    };
    let state_dir = opts.state_dir()?;
    let socket_path = if fds.is_empty() {
        Some(opts.socket_path()?)
    } else {
        None
    };
    let group = match (&opts.socket_group, &socket_path) {
        (Some(name), Some(_)) => {
            Some(listener::resolve_group(name).map_err(DaemonError::Listener)?)
        }
        _ => None,
    };

    // The socket first: a daemon that cannot listen must not create or touch its store.
    let (listener, socket_file, listening_on) = match socket_path {
        None => {
            let listener = listener::from_activation(fds)
                .map_err(DaemonError::Listener)?
                .ok_or(DaemonError::NoSocketPath)?;
            if !fds.is_empty() {
                tracing::warn!(names = ?fds.names().collect::<Vec<_>>(), "closing the other passed fds");
            }
            if opts.socket.is_some() || opts.socket_group.is_some() {
                tracing::info!(
                    "socket-activated: --socket and --socket-group are ignored (the .socket unit sets them)"
                );
            }
            (listener, None, "the socket-activated fd".to_owned())
        }
        Some(path) => {
            let (listener, file) = listener::bind(&path, group).map_err(DaemonError::Listener)?;
            (listener, Some(file), path.display().to_string())
        }
    };
    let max_attempts = config.max_attempts;
    let (store, stats) = tokio::task::spawn_blocking(move || {
        let mut store = Store::open_in(&state_dir)?;
        let expired = store.sweep(max_attempts, now_ms())?;
        let stats = store.stats()?;
        tracing::info!(
            path = %store.path().display(),
            expired_leases = expired.len(),
            "job store open"
        );
        Ok::<_, StoreError>((store, stats))
    })
    .await
    .map_err(|source| StoreError::Task {
        op: "open the store".into(),
        source,
    })
    .and_then(|opened| opened)
    .map_err(DaemonError::Store)?;

    Ok(Started {
        listener,
        socket_file,
        listening_on,
        store: SharedStore::new(store),
        config,
        stats,
    })
}

/// Sweeps expired leases, prunes finished jobs past their retention and counts the jobs
/// through the store; ticks `progress` only when that returned, so a wedged database withholds
/// the pings.
///
/// It runs when there is something to do, not on a timer: after a commit (at most once per
/// [`MAINTENANCE_INTERVAL`], for the counts), when the first lease runs out, every
/// [`RETENTION_CHECK`] for the retention, and, with a watchdog, once per watchdog timeout so
/// that a wedged store is found while the daemon is idle. In between it waits in
/// [`Progress::idle`]: an idle daemon wakes only for its pings and that store check.
async fn maintain(
    store: SharedStore,
    config: watch::Receiver<Config>,
    counts: watch::Sender<Stats>,
    stop: CancellationToken,
    progress: Progress,
    watchdog: Option<Duration>,
) {
    let mut commits = store.subscribe_commits();
    let mut failing = false;
    loop {
        let (max_attempts, keep_secs, keep_max) = {
            let c = config.borrow();
            (c.max_attempts, c.keep_finished_secs, c.keep_finished_max)
        };
        let call = store.call("maintenance", move |s| {
            s.sweep(max_attempts, now_ms())?;
            let pruned = s.prune(keep_secs, keep_max, PRUNE_STEP, now_ms())?;
            if pruned > 0 {
                tracing::debug!(pruned, "deleted finished jobs past their retention");
            }
            Ok((s.stats()?, s.next_lease_end()?, pruned >= PRUNE_STEP))
        });
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            result = call => result,
        };
        let ran = Instant::now();
        // This call's own commit is not a reason to run again. The writer counts a commit
        // before it answers, and publishes the count after: compare counts, not changes.
        let seen = store.commits();
        let mut next = ran + RETENTION_CHECK;
        if let Some(t) = watchdog {
            // Once per watchdog timeout: a store that hangs then stops the pings within one
            // timeout, and the unit is restarted within two.
            next = next.min(ran + t);
        }
        match result {
            Ok((stats, lease_end, more_to_prune)) => {
                progress.tick();
                if failing {
                    tracing::info!("the job store answers again");
                    failing = false;
                }
                counts.send_if_modified(|c| {
                    let changed = *c != stats;
                    *c = stats;
                    changed
                });
                if let Some(end) = lease_end {
                    let wait = u64::try_from(end.saturating_sub(now_ms())).unwrap_or(0);
                    // +1 ms: the sweep expires leases strictly before its `now`.
                    next = next.min(ran + Duration::from_millis(wait.saturating_add(1)));
                }
                if more_to_prune {
                    next = next.min(ran + MAINTENANCE_INTERVAL);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!("job store maintenance failed: {}", error_chain(&e));
                }
                failing = true;
                next = next.min(ran + MAINTENANCE_INTERVAL);
            }
        }
        let earliest = ran + MAINTENANCE_INTERVAL;
        let wait = async {
            let written = async {
                loop {
                    if commits.changed().await.is_err() {
                        // The writer is gone: every call fails; retry at the next deadline.
                        std::future::pending::<()>().await;
                    }
                    if *commits.borrow_and_update() > seen {
                        break;
                    }
                }
            };
            tokio::select! {
                // Something else was written: the counts may have changed.
                () = written => tokio::time::sleep_until(earliest.max(Instant::now()).min(next)).await,
                () = tokio::time::sleep_until(next) => {}
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = progress.idle(wait) => {}
        }
    }
}

/// The connections part of `STATUS=`: only when the cap was reached (idle connections were
/// shed, or a new one refused), e.g. `connections 4096 of 4096, 12 idle closed to make room`.
fn connections_note(c: &server::ConnectionStats) -> Option<String> {
    if c.shed == 0 && c.refused == 0 && c.open < c.cap {
        return None;
    }
    let mut note = format!(
        "connections {} of {}, {} idle closed to make room",
        c.open, c.cap, c.shed
    );
    if c.refused > 0 {
        note.push_str(&format!(", {} refused (all busy)", c.refused));
    }
    Some(note)
}

/// `STATUS=` with the counts and notes when they changed, at most once per
/// `status_interval_secs`.
async fn report_status(
    store: SharedStore,
    lifecycle: Lifecycle,
    counts: watch::Receiver<Stats>,
    note: watch::Receiver<Option<String>>,
    connections: watch::Receiver<server::ConnectionStats>,
    config: watch::Receiver<Config>,
    stop: CancellationToken,
) {
    let (mut counts, mut note, mut connections) = (counts, note, connections);
    let mut commits = store.subscribe_commits();
    let mut sent = Instant::now();
    loop {
        // Wait for a change of what the line shows (a commit may change the store's trouble),
        // then keep at least `status_interval_secs` between two lines. No timer while idle.
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Ok(()) = counts.changed() => {}
            Ok(()) = note.changed() => {}
            Ok(()) = connections.changed() => {}
            Ok(()) = commits.changed() => {}
        }
        let period = config.borrow().status_interval();
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(sent + period) => {}
        }
        sent = Instant::now();
        counts.borrow_and_update();
        note.borrow_and_update();
        connections.borrow_and_update();
        commits.borrow_and_update();
        let trouble = store.trouble().map(|t| format!("job store failing: {t}"));
        let notes: Vec<String> = [
            trouble,
            connections_note(&connections.borrow()),
            note.borrow().clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let joined = notes.join("; ");
        let line = status_line(
            &counts.borrow(),
            (!joined.is_empty()).then_some(joined.as_str()),
        );
        if lifecycle.state() == State::Stopping
            || lifecycle.last_status().as_deref() == Some(line.as_str())
        {
            continue;
        }
        if let Err(e) = lifecycle.status(&line) {
            tracing::debug!(error = %e, "STATUS= not sent");
        }
    }
}

/// The `SIGHUP` handler's state.
#[derive(Clone)]
struct Reloader {
    path: Option<PathBuf>,
    config: Arc<watch::Sender<Config>>,
    note: Arc<watch::Sender<Option<String>>>,
    counts: watch::Receiver<Stats>,
    lifecycle: Lifecycle,
}

impl Reloader {
    /// Re-reads the configuration. An error keeps the old one; its one-line message is what
    /// the library puts in `STATUS=` ("reload failed: …").
    async fn reload(self) -> Result<(), String> {
        let Some(path) = self.path else {
            tracing::info!("SIGHUP without --config: nothing to re-read");
            return Ok(());
        };
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| format!("the reload task did not finish: {e}"))?;
        let new = match loaded {
            Ok(new) => new,
            Err(e) => {
                let message = error_chain(&e);
                self.note
                    .send_replace(Some(format!("reload failed: {message}")));
                return Err(message);
            }
        };
        tracing::info!(
            lease_secs = new.lease_secs,
            max_attempts = new.max_attempts,
            allowed_uids = ?new.allowed_uids,
            status_interval_secs = new.status_interval_secs,
            "configuration reloaded"
        );
        self.config.send_replace(new);
        self.note.send_replace(None);
        let line = status_line(&self.counts.borrow(), None);
        if let Err(e) = self.lifecycle.status(&line) {
            tracing::debug!(error = %e, "STATUS= not sent");
        }
        Ok(())
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_lists_every_state_and_the_note() {
        let stats = Stats {
            queued: 3,
            claimed: 1,
            completed: 10,
            failed: 0,
            denied: 1,
            quarantined: 0,
        };
        assert_eq!(
            status_line(&stats, None),
            "queued 3, claimed 1, completed 10, failed 0, denied 1, quarantined 0"
        );
        assert!(status_line(&stats, Some("reload failed: x")).ends_with("0; reload failed: x"));
    }

    #[test]
    fn connections_show_in_status_only_once_the_cap_was_reached() {
        let mut c = server::ConnectionStats {
            open: 10,
            cap: 4096,
            shed: 0,
            refused: 0,
        };
        assert_eq!(connections_note(&c), None);
        c.shed = 12;
        c.open = 4096;
        assert_eq!(
            connections_note(&c).as_deref(),
            Some("connections 4096 of 4096, 12 idle closed to make room")
        );
        c.refused = 2;
        assert!(
            connections_note(&c)
                .unwrap()
                .ends_with(", 2 refused (all busy)")
        );
    }
}
