//! The systemd environment, read once into a value.
//!
//! systemd hands a service its supervision parameters through environment variables
//! (`NOTIFY_SOCKET`, `WATCHDOG_USEC`, `LISTEN_FDS`, …). [`SystemdEnv`] takes a snapshot of them,
//! either from the process environment ([`SystemdEnv::from_env`]) or from explicit pairs
//! ([`SystemdEnv::from_vars`]), and validates each one the way `sd-daemon.c` does when it is asked
//! for. The library never changes the process environment: there is no `unset_environment`
//! switch, and child processes should be started with [`SystemdEnv::VARIABLES`] removed
//! (see [`SystemdEnv::scrub`]).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `NOTIFY_SOCKET`: where `sd_notify(3)` messages go.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// `WATCHDOG_USEC`: the watchdog timeout in microseconds (`WatchdogSec=`).
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// `WATCHDOG_PID`: the process the watchdog is meant for.
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";
/// `LISTEN_PID`: the process the passed sockets are meant for.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// `LISTEN_PIDFDID`: the pidfd inode id of the process the passed sockets are meant for (v258+).
pub const LISTEN_PIDFDID: &str = "LISTEN_PIDFDID";
/// `LISTEN_FDS`: how many sockets were passed, starting at fd 3.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// `LISTEN_FDNAMES`: `:`-separated names of the passed sockets.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// `JOURNAL_STREAM`: `DEV:INODE` of the journal stream connected to stdout or stderr.
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";
/// `CREDENTIALS_DIRECTORY`: the unit's credentials (`LoadCredential=`, `SetCredential=`).
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// `INVOCATION_ID`: the 128-bit id of this run of the unit, in hex.
pub const INVOCATION_ID: &str = "INVOCATION_ID";

/// `USEC_INFINITY` in systemd: `(uint64_t) -1`.
const USEC_INFINITY: u64 = u64::MAX;

/// Longest `sun_path` a socket address may use (`sizeof(sun_path) - 1`, leaving room for the
/// terminating NUL as `sockaddr_un_set_path()` requires).
const SUN_PATH_MAX: usize = 107;

/// A value in the environment that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct EnvError {
    /// The variable's name, e.g. `WATCHDOG_USEC`.
    pub var: &'static str,
    /// The offending value (lossily converted to UTF-8).
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl EnvError {
    fn new(var: &'static str, value: &OsStr, reason: &'static str) -> Self {
        Self {
            var,
            value: value.to_string_lossy().into_owned(),
            reason,
        }
    }
}

/// Where `NOTIFY_SOCKET` points, as `sd-daemon.c` parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// `/path`: a filesystem `AF_UNIX` socket.
    Path(PathBuf),
    /// `@name`: a socket in the Linux abstract namespace (the name without the `@`).
    Abstract(Vec<u8>),
    /// `vsock:CID:PORT`, or `vsock-stream:`, `vsock-dgram:`, `vsock-seqpacket:` (systemd 253+,
    /// VM guests). Recognised so that it can be named; this crate cannot send to it.
    Vsock {
        /// Context id of the peer.
        cid: u32,
        /// Port of the peer.
        port: u32,
    },
}

impl std::fmt::Display for NotifyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyAddr::Path(p) => write!(f, "{}", p.display()),
            NotifyAddr::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            NotifyAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

impl NotifyAddr {
    /// Parses a `NOTIFY_SOCKET` value: `/path`, `@abstract` or `vsock:CID:PORT`.
    pub fn parse(value: &OsStr) -> Result<Self, EnvError> {
        let err = |reason| EnvError::new(NOTIFY_SOCKET, value, reason);
        let bytes = value.as_bytes();
        if let Some(rest) = vsock_rest(bytes) {
            let rest = std::str::from_utf8(rest).map_err(|_| err("vsock address is not UTF-8"))?;
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| err("vsock address must be vsock:CID:PORT"))?;
            let cid = parse_decimal_u32(cid).ok_or_else(|| err("vsock CID is not a number"))?;
            let port = parse_decimal_u32(port).ok_or_else(|| err("vsock port is not a number"))?;
            return Ok(NotifyAddr::Vsock { cid, port });
        }
        match bytes.first() {
            Some(b'/') => {
                if bytes.len() > SUN_PATH_MAX {
                    return Err(err("socket path longer than 107 bytes"));
                }
                Ok(NotifyAddr::Path(PathBuf::from(value)))
            }
            Some(b'@') => {
                let name = &bytes[1..];
                if name.is_empty() {
                    return Err(err("empty abstract socket name"));
                }
                if name.len() > SUN_PATH_MAX {
                    return Err(err("abstract socket name longer than 107 bytes"));
                }
                Ok(NotifyAddr::Abstract(name.to_vec()))
            }
            Some(_) => Err(err(
                "not an absolute path, an @abstract name or vsock:CID:PORT",
            )),
            None => Err(err("empty")),
        }
    }
}

/// `JOURNAL_STREAM` parsed: the device and inode of the journal stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalStream {
    /// `st_dev` of the stream.
    pub dev: u64,
    /// `st_ino` of the stream.
    pub ino: u64,
}

/// A snapshot of the environment variables systemd uses to talk to a service.
///
/// Build it once, early in `main`, and pass it by value or reference; nothing in this crate reads
/// the process environment behind its back.
///
/// ```
/// use watchkeeper::SystemdEnv;
/// let env = SystemdEnv::from_vars([("WATCHDOG_USEC", "0")]);
/// // sd_watchdog_enabled() refuses 0 as -EINVAL; so do we.
/// assert!(env.watchdog(std::process::id()).is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemdEnv {
    notify_socket: Option<OsString>,
    watchdog_usec: Option<OsString>,
    watchdog_pid: Option<OsString>,
    listen_pid: Option<OsString>,
    listen_pidfdid: Option<OsString>,
    listen_fds: Option<OsString>,
    listen_fdnames: Option<OsString>,
    journal_stream: Option<OsString>,
    credentials_directory: Option<OsString>,
    invocation_id: Option<OsString>,
}

impl SystemdEnv {
    /// Every variable this type reads. Remove these from a child's environment
    /// (`Command::env_remove`) so that it does not act on its parent's supervision.
    pub const VARIABLES: [&'static str; 10] = [
        NOTIFY_SOCKET,
        WATCHDOG_USEC,
        WATCHDOG_PID,
        LISTEN_PID,
        LISTEN_PIDFDID,
        LISTEN_FDS,
        LISTEN_FDNAMES,
        JOURNAL_STREAM,
        CREDENTIALS_DIRECTORY,
        INVOCATION_ID,
    ];

    /// Reads the variables from the process environment, once.
    pub fn from_env() -> Self {
        Self::from_vars(
            Self::VARIABLES
                .iter()
                .filter_map(|&k| std::env::var_os(k).map(|v| (k, v))),
        )
    }

    /// Builds a snapshot from explicit pairs; names this type does not know are ignored.
    pub fn from_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<OsStr>,
    {
        vars.into_iter()
            .fold(Self::default(), |env, (k, v)| env.with_var(k.as_ref(), v))
    }

    /// Returns the snapshot with one variable set; an unknown name leaves it unchanged.
    #[must_use]
    pub fn with_var(mut self, name: &str, value: impl AsRef<OsStr>) -> Self {
        if let Some(slot) = self.slot_mut(name) {
            *slot = Some(value.as_ref().to_owned());
        }
        self
    }

    /// Returns the snapshot with one variable removed.
    #[must_use]
    pub fn without_var(mut self, name: &str) -> Self {
        if let Some(slot) = self.slot_mut(name) {
            *slot = None;
        }
        self
    }

    fn slot_mut(&mut self, name: &str) -> Option<&mut Option<OsString>> {
        Some(match name {
            NOTIFY_SOCKET => &mut self.notify_socket,
            WATCHDOG_USEC => &mut self.watchdog_usec,
            WATCHDOG_PID => &mut self.watchdog_pid,
            LISTEN_PID => &mut self.listen_pid,
            LISTEN_PIDFDID => &mut self.listen_pidfdid,
            LISTEN_FDS => &mut self.listen_fds,
            LISTEN_FDNAMES => &mut self.listen_fdnames,
            JOURNAL_STREAM => &mut self.journal_stream,
            CREDENTIALS_DIRECTORY => &mut self.credentials_directory,
            INVOCATION_ID => &mut self.invocation_id,
            _ => return None,
        })
    }

    /// The raw value of one of [`SystemdEnv::VARIABLES`], if set.
    pub fn var(&self, name: &str) -> Option<&OsStr> {
        let v = match name {
            NOTIFY_SOCKET => &self.notify_socket,
            WATCHDOG_USEC => &self.watchdog_usec,
            WATCHDOG_PID => &self.watchdog_pid,
            LISTEN_PID => &self.listen_pid,
            LISTEN_PIDFDID => &self.listen_pidfdid,
            LISTEN_FDS => &self.listen_fds,
            LISTEN_FDNAMES => &self.listen_fdnames,
            JOURNAL_STREAM => &self.journal_stream,
            CREDENTIALS_DIRECTORY => &self.credentials_directory,
            INVOCATION_ID => &self.invocation_id,
            _ => return None,
        };
        v.as_deref()
    }

    /// The variables that are set, as pairs, e.g. to pass to a child under test with
    /// `Command::envs`.
    pub fn vars(&self) -> impl Iterator<Item = (&'static str, &OsStr)> + '_ {
        Self::VARIABLES
            .iter()
            .filter_map(move |&k| self.var(k).map(|v| (k, v)))
    }

    /// Removes every supervision variable from a child's environment, so that a child never
    /// answers for its parent (`NOTIFY_SOCKET`, `WATCHDOG_*`, `LISTEN_*`, …).
    pub fn scrub(cmd: &mut std::process::Command) -> &mut std::process::Command {
        for k in Self::VARIABLES {
            cmd.env_remove(k);
        }
        cmd
    }

    /// Whether `NOTIFY_SOCKET` is set, i.e. a manager listens for notifications.
    pub fn is_supervised(&self) -> bool {
        self.notify_socket.is_some()
    }

    /// The parsed `NOTIFY_SOCKET`: `Ok(None)` when unset.
    pub fn notify_socket(&self) -> Result<Option<NotifyAddr>, EnvError> {
        self.notify_socket
            .as_deref()
            .map(NotifyAddr::parse)
            .transpose()
    }

    /// The watchdog timeout meant for process `pid`, validated as `sd_watchdog_enabled(3)` does
    /// (`sd-daemon.c`; numbers are read strictly, see `parse_decimal_u64`):
    ///
    /// 1. `WATCHDOG_USEC` unset: `Ok(None)`;
    /// 2. it does not parse as a decimal `u64`: error;
    /// 3. it is 0 or `USEC_INFINITY`: error (`-EINVAL`);
    /// 4. `WATCHDOG_PID` set but not a valid pid: error;
    /// 5. `WATCHDOG_PID` set to another process: `Ok(None)`;
    /// 6. otherwise the timeout. Ping at half of it.
    pub fn watchdog(&self, pid: u32) -> Result<Option<Duration>, EnvError> {
        let Some(raw) = self.watchdog_usec.as_deref() else {
            return Ok(None);
        };
        let usec = parse_decimal_u64(raw)
            .ok_or_else(|| EnvError::new(WATCHDOG_USEC, raw, "not a decimal number of µs"))?;
        if usec == 0 || usec == USEC_INFINITY {
            return Err(EnvError::new(
                WATCHDOG_USEC,
                raw,
                "must be above 0 and finite",
            ));
        }
        if let Some(raw_pid) = self.watchdog_pid.as_deref() {
            let wpid = parse_pid(raw_pid)
                .ok_or_else(|| EnvError::new(WATCHDOG_PID, raw_pid, "not a valid pid"))?;
            if wpid != pid {
                return Ok(None);
            }
        }
        Ok(Some(Duration::from_micros(usec)))
    }

    /// The parsed `JOURNAL_STREAM` (`DEV:INODE`), `Ok(None)` when unset.
    pub fn journal_stream(&self) -> Result<Option<JournalStream>, EnvError> {
        let Some(raw) = self.journal_stream.as_deref() else {
            return Ok(None);
        };
        let err = || EnvError::new(JOURNAL_STREAM, raw, "must be DEV:INODE in decimal");
        let s = raw.to_str().ok_or_else(err)?;
        let (dev, ino) = s.split_once(':').ok_or_else(err)?;
        Ok(Some(JournalStream {
            dev: parse_decimal_u64(OsStr::new(dev)).ok_or_else(err)?,
            ino: parse_decimal_u64(OsStr::new(ino)).ok_or_else(err)?,
        }))
    }

    /// `CREDENTIALS_DIRECTORY`, if set.
    pub fn credentials_directory(&self) -> Option<&Path> {
        self.credentials_directory.as_deref().map(Path::new)
    }

    /// `INVOCATION_ID`, if set and valid UTF-8.
    pub fn invocation_id(&self) -> Option<&str> {
        self.invocation_id.as_deref().and_then(OsStr::to_str)
    }
}

/// The part after `vsock:`, `vsock-stream:`, `vsock-dgram:` or `vsock-seqpacket:`.
fn vsock_rest(bytes: &[u8]) -> Option<&[u8]> {
    [
        "vsock:",
        "vsock-stream:",
        "vsock-dgram:",
        "vsock-seqpacket:",
    ]
    .iter()
    .find_map(|p| bytes.strip_prefix(p.as_bytes()))
}

/// Strict decimal: ASCII digits only, no sign, no white space, no overflow. (`safe_atou64()` in
/// systemd also takes leading white space and a `+`; no manager writes those.)
pub(crate) fn parse_decimal_u64(s: &OsStr) -> Option<u64> {
    let b = s.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn parse_decimal_u32(s: &str) -> Option<u32> {
    parse_decimal_u64(OsStr::new(s)).and_then(|v| u32::try_from(v).ok())
}

/// A pid as `parse_pid()` accepts it: a positive number that fits `pid_t`.
pub(crate) fn parse_pid(s: &OsStr) -> Option<u32> {
    parse_decimal_u64(s)
        .and_then(|v| i32::try_from(v).ok())
        .filter(|&v| v > 0)
        .map(|v| v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 4242;

    fn wd(pairs: &[(&str, &str)]) -> Result<Option<Duration>, EnvError> {
        SystemdEnv::from_vars(pairs.iter().copied()).watchdog(ME)
    }

    // The cases below mirror sd_watchdog_enabled() in src/libsystemd/sd-daemon/sd-daemon.c.

    #[test]
    fn sd_watchdog_enabled_unset_is_off() {
        assert_eq!(wd(&[]), Ok(None));
    }

    #[test]
    fn sd_watchdog_enabled_zero_is_einval() {
        let e = wd(&[("WATCHDOG_USEC", "0")]).unwrap_err();
        assert_eq!(e.var, "WATCHDOG_USEC");
        assert_eq!(e.value, "0");
    }

    #[test]
    fn sd_watchdog_enabled_infinity_is_einval() {
        assert!(wd(&[("WATCHDOG_USEC", "18446744073709551615")]).is_err());
    }

    #[test]
    fn sd_watchdog_enabled_unparsable_is_error() {
        for bad in [
            "",
            "abc",
            "-5",
            "1.5",
            " 100",
            "100 ",
            "+100",
            "18446744073709551616",
        ] {
            let e = wd(&[("WATCHDOG_USEC", bad)]).unwrap_err();
            assert_eq!(e.var, "WATCHDOG_USEC", "{bad:?}");
            assert!(e.to_string().contains("WATCHDOG_USEC"), "{e}");
        }
    }

    #[test]
    fn sd_watchdog_enabled_valid_without_pid() {
        assert_eq!(
            wd(&[("WATCHDOG_USEC", "2000000")]),
            Ok(Some(Duration::from_secs(2)))
        );
    }

    #[test]
    fn sd_watchdog_enabled_beyond_u32_micros() {
        // 2 hours: would overflow a u32 of µs (71.6 min).
        assert_eq!(
            wd(&[("WATCHDOG_USEC", "7200000000")]),
            Ok(Some(Duration::from_secs(7200)))
        );
    }

    #[test]
    fn sd_watchdog_enabled_pid_ours() {
        assert_eq!(
            wd(&[("WATCHDOG_USEC", "1000"), ("WATCHDOG_PID", "4242")]),
            Ok(Some(Duration::from_micros(1000)))
        );
    }

    #[test]
    fn sd_watchdog_enabled_pid_other_is_off() {
        assert_eq!(
            wd(&[("WATCHDOG_USEC", "1000"), ("WATCHDOG_PID", "1")]),
            Ok(None)
        );
    }

    #[test]
    fn sd_watchdog_enabled_malformed_pid_is_error() {
        for bad in ["", "0", "-1", "abc", "12x", "2147483648"] {
            let e = wd(&[("WATCHDOG_USEC", "1000"), ("WATCHDOG_PID", bad)]).unwrap_err();
            assert_eq!(e.var, "WATCHDOG_PID", "{bad:?}");
        }
    }

    #[test]
    fn sd_watchdog_enabled_checks_usec_before_pid() {
        // A bad WATCHDOG_USEC is reported even when the pid is someone else's.
        let e = wd(&[("WATCHDOG_USEC", "0"), ("WATCHDOG_PID", "1")]).unwrap_err();
        assert_eq!(e.var, "WATCHDOG_USEC");
    }

    #[test]
    fn notify_socket_forms() {
        let p = |s: &str| NotifyAddr::parse(OsStr::new(s));
        assert_eq!(
            p("/run/systemd/notify"),
            Ok(NotifyAddr::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            p("@/org/freedesktop/systemd1/notify"),
            Ok(NotifyAddr::Abstract(
                b"/org/freedesktop/systemd1/notify".to_vec()
            ))
        );
        for v in [
            "vsock:2:1234",
            "vsock-stream:2:1234",
            "vsock-dgram:2:1234",
            "vsock-seqpacket:2:1234",
        ] {
            assert_eq!(p(v), Ok(NotifyAddr::Vsock { cid: 2, port: 1234 }), "{v}");
        }
        for bad in ["", "relative/path", "@", "vsock:", "vsock:x:1", "vsock:2"] {
            let e = p(bad).unwrap_err();
            assert_eq!(e.var, "NOTIFY_SOCKET", "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(107));
        assert!(p(&long).is_err());
        assert!(p(&long[..107]).is_ok());
    }

    #[test]
    fn journal_stream_parse() {
        let env = SystemdEnv::from_vars([("JOURNAL_STREAM", "9:7032223")]);
        assert_eq!(
            env.journal_stream(),
            Ok(Some(JournalStream {
                dev: 9,
                ino: 7032223
            }))
        );
        for bad in ["9", "9:", ":1", "a:b", "9:1:2"] {
            let env = SystemdEnv::from_vars([("JOURNAL_STREAM", bad)]);
            assert!(env.journal_stream().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vars_round_trip_and_unknown_ignored() {
        let env = SystemdEnv::from_vars([
            ("NOTIFY_SOCKET", "@x"),
            ("PATH", "/bin"),
            ("INVOCATION_ID", "abc"),
        ]);
        let pairs: Vec<_> = env.vars().collect();
        assert_eq!(
            pairs,
            vec![
                ("NOTIFY_SOCKET", OsStr::new("@x")),
                ("INVOCATION_ID", OsStr::new("abc"))
            ]
        );
        assert_eq!(env.invocation_id(), Some("abc"));
        assert!(env.is_supervised());
        assert!(!env.without_var("NOTIFY_SOCKET").is_supervised());
    }
}
