//! The worker's heartbeat file: the counters operators read (`cycle_count`, `jobs_completed`,
//! `jobs_denied`, `jobs_quarantined`), its health and a few `extra` fields, handed to the
//! library's coalescing writer every cycle and written at most once per [`MIN_INTERVAL`].
//!
//! While the file cannot be written (disk full, read-only file system, …) the worker is
//! `degraded`: [`WorkerHeartbeat::check`] gives the error for `STATUS=`, and the episode is
//! logged once at `warn` when it starts and once at `info` when a write succeeds again, instead
//! of a warning every cycle.

use std::time::Duration;

use watchkeeper::heartbeat::{
    CoalescingHeartbeat, HealthStatus, Heartbeat, HeartbeatError, HeartbeatWriter,
};

/// The shortest time between two writes. The file's timestamps are whole seconds, so writing
/// more often would only refresh the counters, at the price of two `fsync`s each time.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Work-loop cycles completed.
pub(crate) const CYCLES: &str = "cycle_count";
/// Jobs reported with `complete`, whatever their exit code.
const COMPLETED: &str = "jobs_completed";
/// Jobs refused (not on the allowlist, malformed).
const DENIED: &str = "jobs_denied";
/// Jobs set aside as poison.
const QUARANTINED: &str = "jobs_quarantined";

/// What one heartbeat reports besides the cycle count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot<'a> {
    pub(crate) worker: &'a str,
    pub(crate) health: HealthStatus,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) denied: u64,
    pub(crate) quarantined: u64,
    pub(crate) released: u64,
    pub(crate) running_job: Option<u64>,
    pub(crate) unreported: u64,
}

/// The heartbeat, its writer (when `--heartbeat` was given) and the state of a failing episode.
#[derive(Debug)]
pub(crate) struct WorkerHeartbeat {
    hb: Heartbeat,
    writer: Option<CoalescingHeartbeat>,
    /// The drill `--drill-stale-heartbeat-after N`: no update after N cycles.
    stale_after: Option<u64>,
    stale_logged: bool,
    /// While the latest write failed: its error, for `STATUS=`.
    failing: Option<String>,
    /// Failed writes seen when the current episode began.
    failures_at_start: u64,
}

impl WorkerHeartbeat {
    /// Declares the counters (so that they are in the file from the first write on) and starts
    /// the writer thread.
    pub(crate) fn new(
        hb: Heartbeat,
        writer: Option<HeartbeatWriter>,
        stale_after: Option<u64>,
    ) -> Result<Self, HeartbeatError> {
        let mut hb = hb;
        for name in [CYCLES, COMPLETED, DENIED, QUARANTINED] {
            // Constant, valid names: this cannot fail.
            let _ = hb.set_counter(name, 0);
        }
        let writer = writer
            .map(|w| w.spawn_coalescing(MIN_INTERVAL))
            .transpose()?;
        Ok(WorkerHeartbeat {
            hb,
            writer,
            stale_after,
            stale_logged: false,
            failing: None,
            failures_at_start: 0,
        })
    }

    /// Cycles completed so far.
    pub(crate) fn cycles(&self) -> u64 {
        self.hb.counter(CYCLES)
    }

    /// Counts one more cycle.
    pub(crate) fn next_cycle(&mut self) {
        // The name is one of those declared in `new`.
        let _ = self.hb.add_counter(CYCLES, 1);
    }

    /// Fills in the heartbeat and hands it to the writer, which writes it within
    /// [`MIN_INTERVAL`]. Never waits for the disk.
    pub(crate) fn publish(&mut self, s: Snapshot<'_>) {
        let hb = &mut self.hb;
        for (name, value) in [
            (COMPLETED, s.completed),
            (DENIED, s.denied),
            (QUARANTINED, s.quarantined),
        ] {
            let _ = hb.set_counter(name, value);
        }
        hb.health_status = s.health;
        let extra = [
            ("worker", serde_json::json!(s.worker)),
            ("jobs_failed", s.failed.into()),
            ("jobs_released", s.released.into()),
            ("running_job", s.running_job.into()),
            ("unreported", s.unreported.into()),
        ];
        for (k, v) in extra {
            hb.extra.insert(k.to_owned(), v);
        }
        hb.touch();
        if let Some(after) = self.stale_after
            && hb.counter(CYCLES) > after
        {
            if !self.stale_logged {
                self.stale_logged = true;
                tracing::warn!(
                    cycles = after,
                    "drill: no longer writing the heartbeat (the loop keeps running)"
                );
            }
            return;
        }
        if let Some(writer) = &self.writer {
            writer.update(hb);
        }
    }

    /// Looks at the outcome of the latest write: `Some(error)` while the heartbeat cannot be
    /// written. Logs the start of a failing episode (`warn`) and its end (`info`), once each.
    pub(crate) fn check(&mut self) -> Option<&str> {
        let writer = self.writer.as_ref()?;
        let status = writer.status();
        match (&status.last_error, self.failing.is_some()) {
            (Some(e), false) => {
                let text = crate::chain(&**e);
                tracing::warn!(
                    error = %text,
                    "heartbeat not written; degraded until a write succeeds (retried every {}s)",
                    MIN_INTERVAL.as_secs()
                );
                self.failures_at_start = status.failures;
                self.failing = Some(text);
            }
            (Some(e), true) => {
                // The same episode; the cause may have changed (e.g. ENOSPC, then EROFS).
                self.failing = Some(crate::chain(&**e));
            }
            (None, true) => {
                tracing::info!(
                    path = %writer.path().display(),
                    failed_writes = status.failures.saturating_sub(self.failures_at_start) + 1,
                    "heartbeat written again; no longer degraded"
                );
                self.failing = None;
            }
            (None, false) => {}
        }
        self.failing.as_deref()
    }

    /// Writes the latest heartbeat now (at the end of the run).
    pub(crate) async fn flush(&mut self) {
        let Some(writer) = &self.writer else {
            return;
        };
        if let Err(e) = writer.flush().await
            && self.failing.is_none()
        {
            tracing::warn!(error = %crate::chain(&*e), "last heartbeat not written");
        }
    }
}

/// The `STATUS=` line while the heartbeat cannot be written: `degraded`, naming the error,
/// followed by what the worker does.
pub(crate) fn degraded_status(text: &str, error: &str) -> String {
    match text.strip_prefix("degraded: ") {
        Some(rest) => format!("degraded: heartbeat not written: {error}; {rest}"),
        None => format!("degraded: heartbeat not written: {error}; {text}"),
    }
}

/// The health to report: `degraded` instead of `ok` while the heartbeat cannot be written.
pub(crate) fn health(health: HealthStatus, failing: bool) -> HealthStatus {
    match health {
        HealthStatus::Ok if failing => HealthStatus::Degraded,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use watchkeeper::SystemdEnv;
    use watchkeeper::heartbeat::check_heartbeat;

    use super::*;

    fn snapshot(health: HealthStatus) -> Snapshot<'static> {
        Snapshot {
            worker: "w1",
            health,
            completed: 3,
            failed: 1,
            denied: 2,
            quarantined: 0,
            released: 0,
            running_job: Some(7),
            unreported: 0,
        }
    }

    #[test]
    fn status_and_health_while_degraded() {
        assert_eq!(
            degraded_status("idle; 1 completed", "disk full"),
            "degraded: heartbeat not written: disk full; idle; 1 completed"
        );
        assert_eq!(
            degraded_status("degraded: daemon unreachable: x", "disk full"),
            "degraded: heartbeat not written: disk full; daemon unreachable: x"
        );
        assert_eq!(health(HealthStatus::Ok, true), HealthStatus::Degraded);
        assert_eq!(health(HealthStatus::Ok, false), HealthStatus::Ok);
        assert_eq!(health(HealthStatus::Stopping, true), HealthStatus::Stopping);
    }

    #[tokio::test]
    async fn the_file_keeps_the_fields_operators_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        let hb = Heartbeat::new("watchkeeper-worker", &SystemdEnv::default());
        let mut w =
            WorkerHeartbeat::new(hb, Some(HeartbeatWriter::open(&path).unwrap()), None).unwrap();
        w.next_cycle();
        w.publish(snapshot(HealthStatus::Ok));
        w.flush().await;
        assert_eq!(w.check(), None);
        let text = std::fs::read_to_string(&path).unwrap();
        let fields = concat!(
            r#""cycle_count":1,"jobs_completed":3,"jobs_denied":2,"jobs_quarantined":0,"#,
            r#""health_status":"ok","extra":{"jobs_failed":1,"jobs_released":0,"#,
            r#""running_job":7,"unreported":0,"worker":"w1"}}"#
        );
        assert!(text.ends_with(&format!("{fields}\n")), "{text}");
        let read = check_heartbeat(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(read.pid, Some(std::process::id()));
    }
}
