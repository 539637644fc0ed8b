//! Everything this program reads from a heartbeat, in one place: the rest of the program uses
//! [`Facts`] only, never the library's `Heartbeat` fields.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use watchkeeper::heartbeat::{HealthStatus, HeartbeatError, check_heartbeat};

/// What a heartbeat file says, judged against a maximum age.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub(crate) struct Facts {
    /// The file exists.
    pub(crate) found: bool,
    /// Its age is at most the maximum age.
    pub(crate) fresh: bool,
    pub(crate) age_secs: Option<u64>,
    /// The writer's pid.
    pub(crate) pid: Option<u32>,
    pub(crate) cycle_count: u64,
    pub(crate) jobs_completed: u64,
    pub(crate) jobs_denied: u64,
    pub(crate) jobs_quarantined: u64,
    /// `starting`, `ok`, `degraded`, `stalled`, `stopping` or `unknown`.
    pub(crate) health_status: String,
    /// Why the file could not be read (corrupt, newer format, not a file, no permission).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    /// This uid may not read the file (or search its directory): nothing is known about it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) permission_denied: bool,
}

impl Facts {
    /// The service says it is degraded or stalled.
    pub(crate) fn self_degraded(&self) -> bool {
        matches!(self.health_status.as_str(), "degraded" | "stalled")
    }

    /// The service says it works normally.
    pub(crate) fn says_ok(&self) -> bool {
        self.health_status == HealthStatus::Ok.as_str()
    }
}

/// Reads the heartbeat at `path`.
pub(crate) fn read(path: &Path, max_age: Duration) -> Facts {
    match check_heartbeat(path, max_age) {
        Ok(st) => {
            let mut f = Facts {
                found: st.found,
                fresh: st.fresh,
                age_secs: st.age_secs,
                pid: st.pid,
                health_status: HealthStatus::Unknown.as_str().to_owned(),
                ..Facts::default()
            };
            if let Some(hb) = st.heartbeat {
                f.cycle_count = hb.counter("cycle_count");
                f.jobs_completed = hb.counter("jobs_completed");
                f.jobs_denied = hb.counter("jobs_denied");
                f.jobs_quarantined = hb.counter("jobs_quarantined");
                f.health_status = hb.health_status.as_str().to_owned();
            }
            f
        }
        Err(e) => Facts {
            found: path.exists(),
            // From the error itself: opening the path again could block (a FIFO) or race.
            permission_denied: matches!(&e, HeartbeatError::Io { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied),
            health_status: HealthStatus::Unknown.as_str().to_owned(),
            error: Some(crate::exit::one_line(&e)),
            ..Facts::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FIFO at the heartbeat's path: an answer at once, not a wait for a writer.
    #[test]
    fn a_fifo_is_unreadable_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("heartbeat.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read(&path, Duration::from_secs(120)));
        });
        let facts = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("read blocked on the FIFO");
        assert!(!facts.permission_denied);
        let e = facts.error.expect("an error");
        assert!(e.contains("not a regular file"), "{e}");
    }
}
