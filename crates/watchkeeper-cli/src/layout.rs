//! Where things are, for the user's or the system's manager.

use std::path::{Path, PathBuf};

/// The shipped unit names.
pub(crate) const DAEMON: &str = "watchkeeper-daemon.service";
pub(crate) const SOCKET: &str = "watchkeeper-daemon.socket";
pub(crate) const WORKER: &str = "watchkeeper-worker.service";
/// Pattern for the template's instances.
pub(crate) const WORKER_INSTANCES: &str = "watchkeeper-worker@*.service";

/// Paths of one installation.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) user: bool,
    home: PathBuf,
}

impl Layout {
    pub(crate) fn new(user: bool) -> Layout {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
        Layout { user, home }
    }

    fn config_home(&self) -> PathBuf {
        std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| self.home.join(".config"))
    }

    /// Where unit files go.
    pub(crate) fn unit_dir(&self) -> PathBuf {
        if self.user {
            self.config_home().join("systemd/user")
        } else {
            PathBuf::from("/etc/systemd/system")
        }
    }

    /// The configurations and environment files (`%E/watchkeeper` or `/etc/watchkeeper`).
    pub(crate) fn config_dir(&self) -> PathBuf {
        if self.user {
            self.config_home().join("watchkeeper")
        } else {
            PathBuf::from("/etc/watchkeeper")
        }
    }

    /// The versioned binaries and the manifest: `~/.local/lib/watchkeeper` or
    /// `/usr/local/lib/watchkeeper`.
    pub(crate) fn install_root(&self) -> PathBuf {
        if self.user {
            self.home.join(".local/lib/watchkeeper")
        } else {
            PathBuf::from("/usr/local/lib/watchkeeper")
        }
    }

    /// A unit's `StateDirectory=NAME`: `/var/lib/NAME`; for the user manager
    /// `~/.config/NAME` (systemd 252) or `~/.local/state/NAME` (newer), whichever exists.
    pub(crate) fn state_dir(&self, name: &str) -> PathBuf {
        if !self.user {
            return Path::new("/var/lib").join(name);
        }
        let newer = self.home.join(".local/state").join(name);
        if newer.is_dir() {
            newer
        } else {
            self.config_home().join(name)
        }
    }

    /// The workers' state directory (their heartbeats).
    pub(crate) fn worker_state_dir(&self) -> PathBuf {
        self.state_dir("watchkeeper-worker")
    }
}

/// The heartbeat file of a worker unit: `heartbeat.json` for the plain service,
/// `heartbeat-INSTANCE.json` for `watchkeeper-worker@INSTANCE.service`.
pub(crate) fn heartbeat_file(unit: &str) -> Option<String> {
    if unit == WORKER {
        return Some("heartbeat.json".to_owned());
    }
    instance_of(unit).map(|i| format!("heartbeat-{i}.json"))
}

/// `INSTANCE` of `watchkeeper-worker@INSTANCE.service`.
pub(crate) fn instance_of(unit: &str) -> Option<&str> {
    unit.strip_prefix("watchkeeper-worker@")?
        .strip_suffix(".service")
        .filter(|i| !i.is_empty())
}
