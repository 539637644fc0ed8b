//! An atomic, versioned JSON heartbeat file.
//!
//! A service's work loop updates a [`Heartbeat`] each cycle and hands it to a
//! [`CoalescingHeartbeat`] (a [`HeartbeatWriter`] on a background thread that writes the latest
//! heartbeat at most once per interval, see [`HeartbeatWriter::spawn_coalescing`]) or writes it
//! itself with [`HeartbeatWriter::write`]; an operator tool calls [`check_heartbeat`] (or
//! [`read_heartbeat`] with an explicit clock) to tell a live service from a stale one,
//! independently of systemd's own watchdog.
//!
//! A heartbeat is not tied to one kind of service: besides its identity and health it holds
//! named counters ([`Heartbeat::set_counter`], [`Heartbeat::add_counter`]) and free-form
//! `extra` fields.
//!
//! # File format
//!
//! One JSON object in UTF-8, written on a single line and followed by a newline, at most
//! [`MAX_FILE_SIZE`] bytes:
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "service": "ingest",
//!   "pid": 4242,
//!   "invocation_id": "6f1c0d2e9a8b4c7d8e9f0a1b2c3d4e5f",
//!   "started_unix": 1767225600,
//!   "timestamp_unix": 1767225912,
//!   "cycle_count": 311,
//!   "jobs_completed": 1200,
//!   "jobs_denied": 3,
//!   "jobs_quarantined": 1,
//!   "health_status": "ok",
//!   "extra": { "queue_depth": 17 }
//! }
//! ```
//!
//! Times are whole seconds since the Unix epoch. `invocation_id` (systemd's `INVOCATION_ID`) is
//! left out when unknown and `extra` when empty. The counters (here `cycle_count` and the
//! `jobs_*` of the reference worker) are top-level unsigned integers between `timestamp_unix`
//! and `health_status`, in name order; a counter never set is left out. `health_status` is one
//! of `starting`, `ok`, `degraded`, `stalled` or `stopping`; readers map any other value to
//! [`HealthStatus::Unknown`]. Readers require only `format_version`, `service`, `pid` and
//! `timestamp_unix`; the other known fields default to 0, none, empty or `unknown`, any other
//! top-level unsigned integer is read as a counter and other unknown fields are ignored.
//!
//! A heartbeat is fresh when it is at most `max_age` old and stamped at most
//! [`FUTURE_TOLERANCE`] (5 s) ahead of the reader's clock.
//!
//! # Changes from the fixed-field heartbeat
//!
//! The fields `cycle_count`, `jobs_completed`, `jobs_denied` and `jobs_quarantined` became
//! named counters: `hb.cycle_count += 1` is now `hb.add_counter("cycle_count", 1)?` and
//! `hb.jobs_denied` is `hb.counter("jobs_denied")`. The file is unchanged for a heartbeat that
//! sets these counters. [`Heartbeat`] and [`HeartbeatStatus`] are `#[non_exhaustive]`: build a
//! heartbeat with [`Heartbeat::new`]. [`HeartbeatStatus`] gained `ahead_secs`, and a heartbeat
//! from the future is no longer fresh.
//!
//! # Atomicity
//!
//! [`HeartbeatWriter::write`] never modifies the heartbeat file in place. It writes the whole
//! document to a temporary file in the same directory (`.<file>.tmp`, mode 0600, opened with
//! `O_NOFOLLOW`), `fsync`s it, `rename`s it over the heartbeat file and then `fsync`s the
//! directory. A reader therefore sees either the previous heartbeat or the new one, never a mix
//! or a partial file, and after `write` returns the new heartbeat survives a crash or power loss.
//! If a step before the rename fails the temporary file is removed and the previous heartbeat
//! stays intact. `write` blocks on two `fsync`s: async loops use a [`CoalescingHeartbeat`],
//! whose `update` never waits for the disk.
//! One writer per heartbeat file: two writers would share the temporary file.
//!
//! # Versioning
//!
//! `format_version` is [`FORMAT_VERSION`] and is raised only for changes an older reader cannot
//! handle; new optional fields do not raise it. The rule works in both directions:
//!
//! * a writer refuses to overwrite a file whose `format_version` is newer than its own
//!   ([`HeartbeatWriter::open`] fails with [`HeartbeatError::NewerFormat`]), so that an old
//!   binary started by mistake does not downgrade the file under a newer reader;
//! * a reader rejects a file with a newer `format_version` with
//!   [`HeartbeatError::NewerFormat`] rather than guessing at its meaning. The version is parsed
//!   before anything else, so a newer file is reported as newer even if its other fields changed.
//!
//! ```
//! use std::time::Duration;
//! use watchkeeper::SystemdEnv;
//! use watchkeeper::heartbeat::{Heartbeat, HeartbeatWriter, HealthStatus, read_heartbeat};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let path = dir.path().join("ingest/heartbeat.json");
//! let mut writer = HeartbeatWriter::open(&path)?;
//! let mut hb = Heartbeat::new("ingest", &SystemdEnv::from_env());
//! hb.health_status = HealthStatus::Ok;
//! hb.add_counter("cycle_count", 1)?;
//! hb.touch();
//! writer.write(&hb)?;
//!
//! let status = read_heartbeat(&path, Duration::from_secs(120), std::time::SystemTime::now())?;
//! assert!(status.found && status.fresh);
//! assert_eq!(status.heartbeat, Some(hb));
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

/// The heartbeat format this library writes, and the newest one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// How far ahead of the reader's clock a heartbeat may be stamped and still count as fresh:
/// room for clocks that differ a little and for whole-second rounding, not for a heartbeat from
/// the future.
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(5);

/// A sensible default for how old a heartbeat may be and still count as fresh.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(120);

/// The largest heartbeat file, in bytes, that is written or read.
pub const MAX_FILE_SIZE: u64 = 64 * 1024;

/// Mode of the temporary file, and so of the heartbeat file.
const FILE_MODE: u32 = 0o600;

/// Mode of a parent directory that [`HeartbeatWriter::open`] creates.
const DIR_MODE: u32 = 0o700;

/// What the service says about its own health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Initialising; no work cycle has completed yet.
    Starting,
    /// Working normally.
    Ok,
    /// Working, but with reduced capacity or failing dependencies.
    Degraded,
    /// The work loop runs but makes no progress.
    Stalled,
    /// Shutting down.
    Stopping,
    /// A value this version does not know, e.g. written by a newer writer, or a missing field.
    #[serde(other)]
    Unknown,
}

impl HealthStatus {
    /// The lowercase name used in the file, e.g. `"degraded"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Starting => "starting",
            HealthStatus::Ok => "ok",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Stalled => "stalled",
            HealthStatus::Stopping => "stopping",
            HealthStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn unknown_health() -> HealthStatus {
    HealthStatus::Unknown
}

/// The top-level fields of the heartbeat document. A counter cannot take one of these names.
pub const RESERVED_FIELDS: [&str; 8] = [
    "format_version",
    "service",
    "pid",
    "invocation_id",
    "started_unix",
    "timestamp_unix",
    "health_status",
    "extra",
];

/// The longest counter name, in bytes.
pub const MAX_COUNTER_NAME: usize = 128;

/// A counter name that cannot be used (see [`Heartbeat::set_counter`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("heartbeat counter name {name:?}: {reason}")]
pub struct CounterNameError {
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn check_counter_name(name: &str) -> Result<(), CounterNameError> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_COUNTER_NAME {
        "longer than MAX_COUNTER_NAME bytes"
    } else if RESERVED_FIELDS.contains(&name) {
        "is a field of the heartbeat itself"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(CounterNameError {
        name: name.to_owned(),
        reason,
    })
}

/// One heartbeat: the document stored in the heartbeat file (see the [module docs](self)).
///
/// The identity and health fields are public; the named counters (work cycles, jobs done, …)
/// are reached through [`counter`](Self::counter), [`set_counter`](Self::set_counter) and
/// [`add_counter`](Self::add_counter), and are written as top-level integer fields. New
/// optional fields may be added in minor releases (the struct is `#[non_exhaustive]`): build
/// one with [`Heartbeat::new`].
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub struct Heartbeat {
    /// The format of this document; [`FORMAT_VERSION`] when written by this library.
    pub format_version: u32,
    /// Name of the service, e.g. the unit name without `.service`.
    pub service: String,
    /// Process id of the writer.
    pub pid: u32,
    /// systemd's `INVOCATION_ID` of the writer's run, if it has one.
    pub invocation_id: Option<String>,
    /// When the writer started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// When this heartbeat was taken, in seconds since the Unix epoch.
    pub timestamp_unix: u64,
    /// The service's own view of its health.
    pub health_status: HealthStatus,
    /// Service-specific fields of any JSON type; left out of the file when empty.
    pub extra: BTreeMap<String, serde_json::Value>,
    /// Named counters, written as top-level fields in name order.
    counters: BTreeMap<String, u64>,
}

impl Clone for Heartbeat {
    fn clone(&self) -> Self {
        Heartbeat {
            format_version: self.format_version,
            service: self.service.clone(),
            pid: self.pid,
            invocation_id: self.invocation_id.clone(),
            started_unix: self.started_unix,
            timestamp_unix: self.timestamp_unix,
            health_status: self.health_status,
            extra: self.extra.clone(),
            counters: self.counters.clone(),
        }
    }

    /// Reuses the allocations of `self`: a loop that hands over the same service, counters and
    /// `extra` keys every cycle copies values only ([`CoalescingHeartbeat::update`] relies on it).
    fn clone_from(&mut self, source: &Self) {
        self.format_version = source.format_version;
        self.service.clone_from(&source.service);
        self.pid = source.pid;
        self.invocation_id.clone_from(&source.invocation_id);
        self.started_unix = source.started_unix;
        self.timestamp_unix = source.timestamp_unix;
        self.health_status = source.health_status;
        clone_map_from(&mut self.extra, &source.extra);
        clone_map_from(&mut self.counters, &source.counters);
    }
}

/// `dst.clone_from(src)` that keeps `dst`'s nodes when both have the same keys (std's
/// `BTreeMap` rebuilds the whole map).
fn clone_map_from<V: Clone>(dst: &mut BTreeMap<String, V>, src: &BTreeMap<String, V>) {
    if dst.len() == src.len() && dst.keys().zip(src.keys()).all(|(a, b)| a == b) {
        for (d, s) in dst.values_mut().zip(src.values()) {
            d.clone_from(s);
        }
    } else {
        *dst = src.clone();
    }
}

/// The document as written: the counters sit between `timestamp_unix` and `health_status`, so
/// a heartbeat with the counters `cycle_count`, `jobs_completed`, `jobs_denied` and
/// `jobs_quarantined` is written byte for byte as by the earlier fixed-field format.
#[derive(Serialize)]
struct WireOut<'a> {
    format_version: u32,
    service: &'a str,
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    invocation_id: Option<&'a str>,
    started_unix: u64,
    timestamp_unix: u64,
    #[serde(flatten)]
    counters: &'a BTreeMap<String, u64>,
    health_status: HealthStatus,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    extra: &'a BTreeMap<String, serde_json::Value>,
}

/// The document as read: every other top-level field that holds an unsigned integer is a
/// counter; other unknown fields are ignored.
#[derive(Deserialize)]
struct WireIn {
    format_version: u32,
    service: String,
    pid: u32,
    #[serde(default)]
    invocation_id: Option<String>,
    #[serde(default)]
    started_unix: u64,
    timestamp_unix: u64,
    #[serde(default = "unknown_health")]
    health_status: HealthStatus,
    #[serde(default)]
    extra: BTreeMap<String, serde_json::Value>,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

impl Serialize for Heartbeat {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        WireOut {
            format_version: self.format_version,
            service: &self.service,
            pid: self.pid,
            invocation_id: self.invocation_id.as_deref(),
            started_unix: self.started_unix,
            timestamp_unix: self.timestamp_unix,
            counters: &self.counters,
            health_status: self.health_status,
            extra: &self.extra,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Heartbeat {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let w = WireIn::deserialize(deserializer)?;
        let counters = w
            .rest
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.as_u64()?)))
            .collect();
        Ok(Heartbeat {
            format_version: w.format_version,
            service: w.service,
            pid: w.pid,
            invocation_id: w.invocation_id,
            started_unix: w.started_unix,
            timestamp_unix: w.timestamp_unix,
            health_status: w.health_status,
            extra: w.extra,
            counters,
        })
    }
}

impl Heartbeat {
    /// A first heartbeat for this process: version [`FORMAT_VERSION`], pid and invocation id
    /// of the current process, started and taken now, no counters, health
    /// [`HealthStatus::Starting`].
    pub fn new(service: impl Into<String>, env: &crate::env::SystemdEnv) -> Self {
        let now = unix_secs(SystemTime::now());
        Self {
            format_version: FORMAT_VERSION,
            service: service.into(),
            pid: std::process::id(),
            invocation_id: env.invocation_id().map(str::to_owned),
            started_unix: now,
            timestamp_unix: now,
            health_status: HealthStatus::Starting,
            extra: BTreeMap::new(),
            counters: BTreeMap::new(),
        }
    }

    /// Declares counters at 0, so that they are in the file from the first write on (a
    /// counter that was never set is left out, and readers see it as missing).
    ///
    /// # Errors
    ///
    /// As for [`set_counter`](Self::set_counter).
    pub fn with_counters<'a>(
        mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, CounterNameError> {
        for name in names {
            self.set_counter(name, 0)?;
        }
        Ok(self)
    }

    /// The counter `name`, 0 when it was never set (or read from a file without it).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// All counters, in name order.
    pub fn counters(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.counters.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Sets the counter `name`, which becomes a top-level field of the file.
    ///
    /// # Errors
    ///
    /// The name is empty, longer than [`MAX_COUNTER_NAME`], holds a control character, or is
    /// one of the [`RESERVED_FIELDS`]. The heartbeat is then unchanged.
    pub fn set_counter(&mut self, name: &str, value: u64) -> Result<(), CounterNameError> {
        match self.counters.get_mut(name) {
            Some(v) => *v = value,
            None => {
                check_counter_name(name)?;
                self.counters.insert(name.to_owned(), value);
            }
        }
        Ok(())
    }

    /// Adds `n` to the counter `name` (saturating at `u64::MAX`) and returns the new value.
    ///
    /// # Errors
    ///
    /// As for [`set_counter`](Self::set_counter).
    pub fn add_counter(&mut self, name: &str, n: u64) -> Result<u64, CounterNameError> {
        let value = self.counter(name).saturating_add(n);
        self.set_counter(name, value)?;
        Ok(value)
    }

    /// Removes the counter `name` from the heartbeat; returns its value, if it had one.
    pub fn remove_counter(&mut self, name: &str) -> Option<u64> {
        self.counters.remove(name)
    }

    /// Sets [`timestamp_unix`](Self::timestamp_unix) to now. Call it before each
    /// [`HeartbeatWriter::write`] or [`CoalescingHeartbeat::update`].
    pub fn touch(&mut self) {
        self.timestamp_unix = unix_secs(SystemTime::now());
    }
}

/// Seconds since the Unix epoch; 0 for a clock set before 1970.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a heartbeat file could not be written or read. Every variant names the heartbeat file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeartbeatError {
    /// A system call failed; `op` says which step.
    #[error("heartbeat file {}: {op} failed", path.display())]
    Io {
        /// The heartbeat file.
        path: PathBuf,
        /// The step that failed, e.g. `"rename temporary file"`.
        op: &'static str,
        /// The error from the system.
        #[source]
        source: std::io::Error,
    },
    /// The heartbeat path is a symbolic link; the writer neither follows nor replaces one.
    #[error("heartbeat file {}: is a symbolic link, refusing to use it", path.display())]
    SymlinkRefused {
        /// The heartbeat file.
        path: PathBuf,
    },
    /// The heartbeat path exists but is not a regular file (a directory, a FIFO, …).
    #[error("heartbeat file {}: not a regular file", path.display())]
    NotRegularFile {
        /// The heartbeat file.
        path: PathBuf,
    },
    /// The path has no file name (e.g. it ends in `..` or is `/`).
    #[error("heartbeat file {}: invalid path: {reason}", path.display())]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The file has a newer format than this library understands.
    #[error(
        "heartbeat file {}: format_version {found} is newer than the supported version {supported}",
        path.display()
    )]
    NewerFormat {
        /// The heartbeat file.
        path: PathBuf,
        /// The file's `format_version`.
        found: u64,
        /// [`FORMAT_VERSION`].
        supported: u32,
    },
    /// The file, or a heartbeat about to be written, exceeds [`MAX_FILE_SIZE`].
    #[error("heartbeat file {}: {size} bytes exceed the limit of {limit}", path.display())]
    TooLarge {
        /// The heartbeat file.
        path: PathBuf,
        /// The size found (for a file being read: at least this many bytes).
        size: u64,
        /// [`MAX_FILE_SIZE`].
        limit: u64,
    },
    /// The file is empty or ends in the middle of the JSON document.
    #[error("heartbeat file {}: truncated", path.display())]
    Truncated {
        /// The heartbeat file.
        path: PathBuf,
    },
    /// The file is not valid JSON or does not match the heartbeat format (including a missing or
    /// zero `format_version`).
    #[error("heartbeat file {}: corrupt", path.display())]
    Corrupt {
        /// The heartbeat file.
        path: PathBuf,
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// The background thread of a [`CoalescingHeartbeat`] has ended.
    #[error("heartbeat file {}: the writer thread has ended", path.display())]
    WriterStopped {
        /// The heartbeat file.
        path: PathBuf,
    },
    /// The heartbeat could not be encoded as JSON.
    #[error("heartbeat file {}: cannot encode heartbeat", path.display())]
    Encode {
        /// The heartbeat file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },
}

impl HeartbeatError {
    /// The heartbeat file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            HeartbeatError::Io { path, .. }
            | HeartbeatError::SymlinkRefused { path }
            | HeartbeatError::NotRegularFile { path }
            | HeartbeatError::InvalidPath { path, .. }
            | HeartbeatError::NewerFormat { path, .. }
            | HeartbeatError::TooLarge { path, .. }
            | HeartbeatError::Truncated { path }
            | HeartbeatError::Corrupt { path, .. }
            | HeartbeatError::WriterStopped { path }
            | HeartbeatError::Encode { path, .. } => path,
        }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> HeartbeatError {
    move |source| HeartbeatError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

fn errno_err(path: &Path, op: &'static str) -> impl FnOnce(Errno) -> HeartbeatError {
    move |e| io_err(path, op)(e.into())
}

/// Writes heartbeats atomically to one file (see the [module docs](self)).
///
/// Holds the parent directory open, so that every write lands in the directory that was opened
/// and can be made durable with `fsync`.
pub struct HeartbeatWriter {
    path: PathBuf,
    dir: OwnedFd,
    file_name: OsString,
    tmp_name: OsString,
    buf: Vec<u8>,
}

impl std::fmt::Debug for HeartbeatWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatWriter")
            .field("path", &self.path)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl HeartbeatWriter {
    /// Prepares to write heartbeats to `path`.
    ///
    /// Creates the parent directory (and any missing ancestors) with mode 0700 if it does not
    /// exist; an existing directory is left as it is. Fails with
    /// [`HeartbeatError::SymlinkRefused`] if `path` is a symbolic link,
    /// [`HeartbeatError::NotRegularFile`] if it is something else that is not a regular file, and
    /// [`HeartbeatError::NewerFormat`] if it holds a heartbeat with a `format_version` newer than
    /// [`FORMAT_VERSION`]. An existing file that cannot be parsed will be overwritten.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, HeartbeatError> {
        let path = path.into();
        let invalid = |reason| HeartbeatError::InvalidPath {
            path: path.clone(),
            reason,
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| invalid("no file name"))?
            .to_owned();
        let dir_path = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp_name = OsString::with_capacity(file_name.len() + 5);
        tmp_name.push(".");
        tmp_name.push(&file_name);
        tmp_name.push(".tmp");

        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir_path)
            .map_err(io_err(&path, "create parent directory"))?;
        let dir = rustix::fs::open(
            dir_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno_err(&path, "open parent directory"))?;

        let writer = Self {
            path,
            dir,
            file_name,
            tmp_name,
            buf: Vec::with_capacity(1024),
        };
        if writer.check_target()? {
            writer.check_existing_version()?;
        }
        Ok(writer)
    }

    /// The heartbeat file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the heartbeat file with `hb`, atomically and durably (see the
    /// [module docs](self)).
    ///
    /// Fails with [`HeartbeatError::SymlinkRefused`] if a symbolic link has appeared at the path
    /// since [`open`](Self::open), and with [`HeartbeatError::TooLarge`] if the encoded heartbeat
    /// exceeds [`MAX_FILE_SIZE`]. On an error before the rename the previous heartbeat file is
    /// left intact and no temporary file remains; an error from the final directory `fsync`
    /// comes after the rename: the new heartbeat is in place but may not survive a power loss.
    ///
    /// Two `fsync`s make this a blocking call of a few hundred µs to milliseconds: from async
    /// code, use [`HeartbeatWriter::spawn_coalescing`] instead.
    pub fn write(&mut self, hb: &Heartbeat) -> Result<(), HeartbeatError> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, hb).map_err(|source| HeartbeatError::Encode {
            path: self.path.clone(),
            source,
        })?;
        self.buf.push(b'\n');
        let size = self.buf.len() as u64;
        if size > MAX_FILE_SIZE {
            return Err(HeartbeatError::TooLarge {
                path: self.path.clone(),
                size,
                limit: MAX_FILE_SIZE,
            });
        }
        self.check_target()?;

        if let Err(e) = self.write_tmp() {
            // Best effort: the original error is the one worth reporting.
            let _ = rustix::fs::unlinkat(&self.dir, &self.tmp_name, AtFlags::empty());
            return Err(e);
        }
        if let Err(e) = rustix::fs::renameat(&self.dir, &self.tmp_name, &self.dir, &self.file_name)
        {
            let _ = rustix::fs::unlinkat(&self.dir, &self.tmp_name, AtFlags::empty());
            return Err(errno_err(&self.path, "rename temporary file")(e));
        }
        rustix::fs::fsync(&self.dir).map_err(errno_err(&self.path, "fsync parent directory"))
    }

    /// Writes and syncs the temporary file.
    fn write_tmp(&self) -> Result<(), HeartbeatError> {
        // A leftover temporary file (a crash between open and rename) is removed rather than
        // reused: O_EXCL guarantees a fresh inode with our mode and owner, and a hard link
        // planted at that name is never written through.
        match rustix::fs::unlinkat(&self.dir, &self.tmp_name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(errno_err(&self.path, "remove stale temporary file")(e)),
        }
        let fd = rustix::fs::openat(
            &self.dir,
            &self.tmp_name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(errno_err(&self.path, "open temporary file"))?;
        let mut file = File::from(fd);
        file.write_all(&self.buf)
            .map_err(io_err(&self.path, "write temporary file"))?;
        file.sync_all()
            .map_err(io_err(&self.path, "fsync temporary file"))
    }

    /// `lstat`s the target: `Ok(false)` when absent, `Ok(true)` when a regular file.
    fn check_target(&self) -> Result<bool, HeartbeatError> {
        let st = match rustix::fs::statat(&self.dir, &self.file_name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(errno_err(&self.path, "stat")(e)),
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(true),
            FileType::Symlink => Err(HeartbeatError::SymlinkRefused {
                path: self.path.clone(),
            }),
            _ => Err(HeartbeatError::NotRegularFile {
                path: self.path.clone(),
            }),
        }
    }

    /// Refuses to take over a file written in a newer format; anything unparsable is fair game.
    fn check_existing_version(&self) -> Result<(), HeartbeatError> {
        let fd = match rustix::fs::openat(
            &self.dir,
            &self.file_name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(Errno::LOOP) => {
                return Err(HeartbeatError::SymlinkRefused {
                    path: self.path.clone(),
                });
            }
            Err(e) => return Err(errno_err(&self.path, "open existing heartbeat")(e)),
        };
        let result = read_bounded(File::from(fd), &self.path)
            .and_then(|bytes| probe_version(&bytes, &self.path));
        match result {
            Ok(_) => Ok(()),
            Err(e @ (HeartbeatError::NewerFormat { .. } | HeartbeatError::Io { .. })) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "overwriting unreadable heartbeat file");
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The coalescing writer

/// How long dropping a [`CoalescingHeartbeat`] waits for its last write.
const DROP_WAIT: Duration = Duration::from_secs(5);

impl HeartbeatWriter {
    /// Moves the writer to a background thread that writes the latest heartbeat handed to
    /// [`CoalescingHeartbeat::update`] at most once per `min_interval`, and at once on
    /// [`flush`](CoalescingHeartbeat::flush), [`close`](CoalescingHeartbeat::close) or drop.
    ///
    /// A hot loop hands over every cycle's heartbeat; only the newest one is kept, and the
    /// atomic, durable write of [`HeartbeatWriter::write`] (two `fsync`s) happens off the
    /// loop. The background is a thread, not a tokio task, because the write blocks anyway
    /// and because the last heartbeat must reach the disk when the handle is dropped at the
    /// end of `main`, when a runtime may no longer poll its tasks.
    ///
    /// # Errors
    ///
    /// [`HeartbeatError::Io`] if the thread cannot be started.
    pub fn spawn_coalescing(
        self,
        min_interval: Duration,
    ) -> Result<CoalescingHeartbeat, HeartbeatError> {
        let path = self.path.clone();
        let shared = Arc::new(Shared::default());
        let (tx, rx) = tokio::sync::watch::channel(WriterStatus::default());
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("wk-heartbeat".into())
                .spawn(move || write_loop(self, &shared, &tx, min_interval))
                .map_err(io_err(&path, "start the heartbeat writer thread"))?
        };
        Ok(CoalescingHeartbeat {
            shared,
            status: rx,
            thread: Some(thread),
            path,
        })
    }
}

/// What the writer thread has done so far (see [`CoalescingHeartbeat::status`]).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct WriterStatus {
    /// Heartbeats written successfully.
    pub writes: u64,
    /// Writes that failed.
    pub failures: u64,
    /// The error of the latest write, `None` when it succeeded (or none was tried yet). A
    /// failed heartbeat is retried every `min_interval` until it or a newer one is written.
    pub last_error: Option<Arc<HeartbeatError>>,
    /// The newest flush request served.
    flushed: u64,
    /// The thread has ended.
    stopped: bool,
}

impl WriterStatus {
    /// Whether the latest write failed.
    pub fn is_failing(&self) -> bool {
        self.last_error.is_some()
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread.
    wake: Condvar,
    /// Signals the end of the writer thread (`State::finished`).
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if it ever did, the state is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct State {
    /// The newest heartbeat not yet written.
    pending: Option<Heartbeat>,
    /// The thread waits for work, so an update must wake it. False while it waits out
    /// `min_interval`: updates then only replace `pending`.
    idle: bool,
    /// Incremented by each flush request.
    flush_requested: u64,
    /// Write what is pending, then end.
    closed: bool,
    /// The thread has ended.
    finished: bool,
}

fn write_loop(
    mut writer: HeartbeatWriter,
    shared: &Shared,
    status: &tokio::sync::watch::Sender<WriterStatus>,
    min_interval: Duration,
) {
    let mut last_write: Option<std::time::Instant> = None;
    let mut flushed = 0;
    loop {
        let mut st = shared.lock();
        while st.pending.is_none() && !st.closed && st.flush_requested == flushed {
            st.idle = true;
            st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.idle = false;
        // At most one write per min_interval, unless a flush or the close wants it now.
        if let Some(due) = last_write.and_then(|t| t.checked_add(min_interval)) {
            loop {
                let now = std::time::Instant::now();
                if st.closed || st.flush_requested != flushed || now >= due {
                    break;
                }
                st = shared
                    .wake
                    .wait_timeout(st, due - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        let hb = st.pending.take();
        let flush_to = st.flush_requested;
        let closing = st.closed;
        drop(st);

        if let Some(hb) = hb {
            let result = writer.write(&hb);
            last_write = Some(std::time::Instant::now());
            match result {
                Ok(()) => status.send_modify(|s| {
                    s.writes += 1;
                    s.last_error = None;
                }),
                Err(e) => {
                    status.send_modify(|s| {
                        s.failures += 1;
                        s.last_error = Some(Arc::new(e));
                    });
                    if !closing {
                        // Retried after min_interval, unless a newer heartbeat came meanwhile.
                        shared.lock().pending.get_or_insert(hb);
                    }
                }
            }
        }
        flushed = flush_to;
        status.send_modify(|s| {
            s.flushed = flushed;
            s.stopped = closing;
        });
        if closing {
            shared.lock().finished = true;
            shared.done.notify_all();
            return;
        }
    }
}

/// A handle to a [`HeartbeatWriter`] running on a background thread (see
/// [`HeartbeatWriter::spawn_coalescing`]).
///
/// ```
/// use std::time::Duration;
/// use watchkeeper::SystemdEnv;
/// use watchkeeper::heartbeat::{Heartbeat, HeartbeatWriter, HealthStatus, check_heartbeat};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let path = dir.path().join("heartbeat.json");
/// let heartbeats = HeartbeatWriter::open(&path)?.spawn_coalescing(Duration::from_secs(1))?;
/// let mut hb = Heartbeat::new("ingest", &SystemdEnv::from_env()).with_counters(["cycle_count"])?;
/// hb.health_status = HealthStatus::Ok;
/// for _ in 0..10_000 {
///     // ... one cycle of work ...
///     hb.add_counter("cycle_count", 1)?;
///     hb.touch();
///     heartbeats.update(&hb); // never waits for the disk
/// }
/// heartbeats.close().await?; // the last heartbeat is on disk
/// let hb = check_heartbeat(&path, Duration::from_secs(60))?.heartbeat.unwrap();
/// assert_eq!(hb.counter("cycle_count"), 10_000);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct CoalescingHeartbeat {
    shared: Arc<Shared>,
    status: tokio::sync::watch::Receiver<WriterStatus>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: PathBuf,
}

impl CoalescingHeartbeat {
    /// Hands over the newest heartbeat. Never waits for the disk: it copies `hb` under a lock
    /// that the writer thread holds only to take the pending heartbeat out, and wakes the
    /// thread only when it is idle. A heartbeat not yet written is replaced (latest wins).
    pub fn update(&self, hb: &Heartbeat) {
        let mut st = self.shared.lock();
        match &mut st.pending {
            Some(pending) => pending.clone_from(hb),
            None => st.pending = Some(hb.clone()),
        }
        let wake = std::mem::replace(&mut st.idle, false);
        drop(st);
        if wake {
            self.shared.wake.notify_one();
        }
    }

    /// Writes the newest heartbeat now, without waiting out `min_interval`, and returns the
    /// outcome of the latest write (`Ok` if nothing was pending and the previous write
    /// succeeded).
    ///
    /// # Errors
    ///
    /// The error of the latest write, or [`HeartbeatError::WriterStopped`] if the writer
    /// thread has ended.
    pub async fn flush(&self) -> Result<(), Arc<HeartbeatError>> {
        let target = {
            let mut st = self.shared.lock();
            st.flush_requested += 1;
            st.flush_requested
        };
        self.shared.wake.notify_one();
        self.wait_status(|s| s.flushed >= target || s.stopped).await
    }

    /// Writes the newest heartbeat, then ends the writer thread.
    ///
    /// # Errors
    ///
    /// As for [`flush`](Self::flush).
    pub async fn close(mut self) -> Result<(), Arc<HeartbeatError>> {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        let result = self.wait_status(|s| s.stopped).await;
        if let Some(thread) = self.thread.take() {
            // The thread has sent its last status and returns at once.
            let _ = thread.join();
        }
        result
    }

    /// What the writer thread has done so far: writes, failures and the latest error.
    pub fn status(&self) -> WriterStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every change of [`status`](Self::status), e.g. to react to a
    /// failing write as soon as it happens.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<WriterStatus> {
        self.status.clone()
    }

    /// The heartbeat file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn wait_status(
        &self,
        done: impl FnMut(&WriterStatus) -> bool,
    ) -> Result<(), Arc<HeartbeatError>> {
        let mut rx = self.status.clone();
        match rx.wait_for(done).await {
            Ok(s) => s.last_error.clone().map_or(Ok(()), Err),
            Err(_) => Err(Arc::new(HeartbeatError::WriterStopped {
                path: self.path.clone(),
            })),
        }
    }
}

impl Drop for CoalescingHeartbeat {
    /// Writes the newest heartbeat and ends the thread, waiting up to 5 s for it (the write
    /// blocks this thread for that long at most; past it the thread finishes on its own).
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.wake.notify_one();
        let deadline = std::time::Instant::now() + DROP_WAIT;
        while !st.finished {
            let now = std::time::Instant::now();
            if now >= deadline {
                tracing::warn!(
                    path = %self.path.display(),
                    "the last heartbeat was not written within {DROP_WAIT:?}; not waiting longer"
                );
                return;
            }
            st = self
                .shared
                .done
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        drop(st);
        let _ = thread.join();
    }
}

/// What a reader found at a heartbeat path.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HeartbeatStatus {
    /// Whether the file exists.
    pub found: bool,
    /// Whether the heartbeat is no older than the maximum age and stamped no later than
    /// [`FUTURE_TOLERANCE`] ahead of the reader's clock; `false` when not found.
    pub fresh: bool,
    /// Age of the heartbeat in whole seconds; 0 for a timestamp in the future (clock skew).
    pub age_secs: Option<u64>,
    /// How far in the future the heartbeat is stamped, in whole seconds, when it is (a writer
    /// with a clock ahead of the reader's, or a forged file); `None` otherwise.
    pub ahead_secs: Option<u64>,
    /// Process id of the writer.
    pub pid: Option<u32>,
    /// The heartbeat itself.
    pub heartbeat: Option<Heartbeat>,
}

/// Reads the heartbeat at `path` and judges it against `max_age` at time `now`.
///
/// A missing file is not an error: it gives `found == false`. A heartbeat is fresh when its age
/// (`now - timestamp_unix`, in whole seconds, 0 if the timestamp is in the future) is at most
/// `max_age`, and its timestamp is at most [`FUTURE_TOLERANCE`] ahead of `now`: a heartbeat
/// stamped further ahead says nothing about the writer being alive now (a clock that jumped
/// back, a file copied in), so it is not fresh. Files that are not regular files, larger than [`MAX_FILE_SIZE`], truncated,
/// corrupt, or of a newer format are errors (see [`HeartbeatError`]).
pub fn read_heartbeat(
    path: &Path,
    max_age: Duration,
    now: SystemTime,
) -> Result<HeartbeatStatus, HeartbeatError> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        // A FIFO at the path must not block the reader.
        .custom_flags(OFlags::NONBLOCK.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(HeartbeatStatus {
                found: false,
                fresh: false,
                age_secs: None,
                ahead_secs: None,
                pid: None,
                heartbeat: None,
            });
        }
        Err(e) => return Err(io_err(path, "open")(e)),
    };
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    if !meta.is_file() {
        return Err(HeartbeatError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    let bytes = read_bounded(file, path)?;
    let hb = parse(&bytes, path)?;
    let now = unix_secs(now);
    let age = now.saturating_sub(hb.timestamp_unix);
    let ahead = hb.timestamp_unix.saturating_sub(now);
    Ok(HeartbeatStatus {
        found: true,
        fresh: Duration::from_secs(age) <= max_age
            && Duration::from_secs(ahead) <= FUTURE_TOLERANCE,
        age_secs: Some(age),
        ahead_secs: (ahead > 0).then_some(ahead),
        pid: Some(hb.pid),
        heartbeat: Some(hb),
    })
}

/// [`read_heartbeat`] at the current time.
pub fn check_heartbeat(path: &Path, max_age: Duration) -> Result<HeartbeatStatus, HeartbeatError> {
    read_heartbeat(path, max_age, SystemTime::now())
}

/// Reads at most [`MAX_FILE_SIZE`] bytes, failing if there are more.
fn read_bounded(file: File, path: &Path) -> Result<Vec<u8>, HeartbeatError> {
    let mut bytes = Vec::new();
    let n = file
        .take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path, "read"))? as u64;
    if n > MAX_FILE_SIZE {
        return Err(HeartbeatError::TooLarge {
            path: path.to_owned(),
            size: n,
            limit: MAX_FILE_SIZE,
        });
    }
    Ok(bytes)
}

fn json_err(path: &Path, source: serde_json::Error) -> HeartbeatError {
    if source.is_eof() {
        HeartbeatError::Truncated {
            path: path.to_owned(),
        }
    } else {
        HeartbeatError::Corrupt {
            path: path.to_owned(),
            source,
        }
    }
}

/// Just the version, so that a newer file is recognised whatever else changed in it.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u64,
}

/// Validates `format_version` and returns it.
fn probe_version(bytes: &[u8], path: &Path) -> Result<u64, HeartbeatError> {
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(|e| json_err(path, e))?;
    match probe.format_version {
        0 => Err(HeartbeatError::Corrupt {
            path: path.to_owned(),
            source: serde::de::Error::custom("format_version 0 is not valid"),
        }),
        v if v > u64::from(FORMAT_VERSION) => Err(HeartbeatError::NewerFormat {
            path: path.to_owned(),
            found: v,
            supported: FORMAT_VERSION,
        }),
        v => Ok(v),
    }
}

fn parse(bytes: &[u8], path: &Path) -> Result<Heartbeat, HeartbeatError> {
    probe_version(bytes, path)?;
    serde_json::from_slice(bytes).map_err(|e| json_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::SystemdEnv;
    use std::os::unix::fs::PermissionsExt;

    const T0: u64 = 1_767_225_600;

    fn sample() -> Heartbeat {
        let env = SystemdEnv::from_vars([("INVOCATION_ID", "0123456789abcdef0123456789abcdef")]);
        let mut hb = Heartbeat::new("svc", &env);
        hb.timestamp_unix = T0;
        hb.started_unix = T0 - 10;
        hb.set_counter("cycle_count", 7).unwrap();
        hb.set_counter("jobs_completed", 5).unwrap();
        hb.set_counter("jobs_denied", 1).unwrap();
        hb.set_counter("jobs_quarantined", 2).unwrap();
        hb.health_status = HealthStatus::Degraded;
        hb.extra
            .insert("queue".into(), serde_json::json!({"depth": 3}));
        hb
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn read_at(path: &Path, secs: u64) -> Result<HeartbeatStatus, HeartbeatError> {
        read_heartbeat(path, DEFAULT_MAX_AGE, at(secs))
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn new_fills_identity_and_touch_advances() {
        let env = SystemdEnv::from_vars([("INVOCATION_ID", "abc")]);
        let mut hb = Heartbeat::new("svc", &env);
        assert_eq!(hb.format_version, FORMAT_VERSION);
        assert_eq!(hb.pid, std::process::id());
        assert_eq!(hb.invocation_id.as_deref(), Some("abc"));
        assert_eq!(hb.health_status, HealthStatus::Starting);
        assert!(hb.timestamp_unix > T0 - 1_000_000_000);
        assert_eq!(
            Heartbeat::new("svc", &SystemdEnv::default()).invocation_id,
            None
        );
        hb.timestamp_unix = 5;
        hb.touch();
        assert!(hb.timestamp_unix >= hb.started_unix);
        assert_eq!(unix_secs(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn counters_are_written_as_the_fixed_fields_were() {
        // The bytes the earlier fixed-field format wrote for this heartbeat.
        let want = format!(
            concat!(
                r#"{{"format_version":1,"service":"svc","pid":{},"#,
                r#""invocation_id":"0123456789abcdef0123456789abcdef","#,
                r#""started_unix":{},"timestamp_unix":{},"cycle_count":7,"jobs_completed":5,"#,
                r#""jobs_denied":1,"jobs_quarantined":2,"health_status":"degraded","#,
                r#""extra":{{"queue":{{"depth":3}}}}}}"#,
                "\n"
            ),
            std::process::id(),
            T0 - 10,
            T0
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        HeartbeatWriter::open(&path)
            .unwrap()
            .write(&sample())
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), want);
        assert_eq!(read_at(&path, T0).unwrap().heartbeat, Some(sample()));
    }

    #[test]
    fn clone_from_copies_everything() {
        let mut a = Heartbeat::new("other", &SystemdEnv::default());
        a.clone_from(&sample());
        assert_eq!(a, sample());
        // Same keys: values are copied in place.
        let mut b = sample();
        b.set_counter("cycle_count", 99).unwrap();
        b.extra.insert("queue".into(), serde_json::json!("x"));
        a.clone_from(&b);
        assert_eq!(a, b);
        assert_eq!(a.clone(), b);
    }

    #[test]
    fn counter_accessors() {
        let mut hb = Heartbeat::new("svc", &SystemdEnv::default());
        assert_eq!(hb.counter("cycle_count"), 0);
        assert_eq!(hb.counters().count(), 0);
        assert_eq!(hb.add_counter("cycle_count", 2).unwrap(), 2);
        assert_eq!(hb.add_counter("cycle_count", 3).unwrap(), 5);
        hb.set_counter("bytes", u64::MAX - 1).unwrap();
        assert_eq!(hb.add_counter("bytes", 10).unwrap(), u64::MAX);
        assert_eq!(
            hb.counters().collect::<Vec<_>>(),
            [("bytes", u64::MAX), ("cycle_count", 5)]
        );
        assert_eq!(hb.remove_counter("bytes"), Some(u64::MAX));
        let hb = Heartbeat::new("svc", &SystemdEnv::default())
            .with_counters(["a", "b"])
            .unwrap();
        let text = serde_json::to_string(&hb).unwrap();
        assert!(text.contains(r#""a":0,"b":0"#), "{text}");
    }

    #[test]
    fn bad_counter_names_are_refused_and_change_nothing() {
        let mut hb = Heartbeat::new("svc", &SystemdEnv::default());
        let long = "x".repeat(MAX_COUNTER_NAME + 1);
        for bad in ["", "pid", "timestamp_unix", "extra", "a\nb", long.as_str()] {
            let e = hb.set_counter(bad, 1).unwrap_err();
            assert_eq!(e.name, bad);
            assert!(e.to_string().contains("heartbeat counter name"), "{e}");
            assert!(hb.add_counter(bad, 1).is_err());
        }
        assert!(
            Heartbeat::new("s", &SystemdEnv::default())
                .with_counters(["ok", "service"])
                .is_err()
        );
        assert_eq!(hb.counters().count(), 0);
        let text = serde_json::to_string(&hb).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["pid"], std::process::id());
    }

    #[test]
    fn unknown_integer_fields_read_as_counters() {
        let text = br#"{"format_version": 1, "service": "s", "pid": 1, "timestamp_unix": 1,
            "requests": 42, "ratio": 0.5, "delta": -3, "label": "x", "cycle_count": 9}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        std::fs::write(&path, text).unwrap();
        let hb = read_at(&path, 1).unwrap().heartbeat.unwrap();
        assert_eq!(
            hb.counters().collect::<Vec<_>>(),
            [("cycle_count", 9), ("requests", 42)]
        );
    }

    #[test]
    fn round_trip_write_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        let mut w = HeartbeatWriter::open(&path).unwrap();
        assert_eq!(w.path(), path);
        let mut hb = sample();
        w.write(&hb).unwrap();
        let st = read_at(&path, T0 + 1).unwrap();
        assert_eq!(
            st,
            HeartbeatStatus {
                found: true,
                fresh: true,
                age_secs: Some(1),
                ahead_secs: None,
                pid: Some(std::process::id()),
                heartbeat: Some(hb.clone()),
            }
        );
        // A second, smaller write replaces the first completely.
        hb.extra.clear();
        hb.invocation_id = None;
        hb.set_counter("cycle_count", 8).unwrap();
        w.write(&hb).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("extra") && !text.contains("invocation_id"),
            "{text}"
        );
        assert!(text.ends_with("}\n"), "{text}");
        assert_eq!(read_at(&path, T0).unwrap().heartbeat, Some(hb));
    }

    #[test]
    fn no_temp_file_left_after_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        let mut w = HeartbeatWriter::open(&path).unwrap();
        w.write(&sample()).unwrap();
        w.write(&sample()).unwrap();
        assert_eq!(dir_entries(dir.path()), ["hb.json"]);
    }

    #[test]
    fn file_mode_0600_and_created_dir_mode_0700() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        let path = sub.join("hb.json");
        HeartbeatWriter::open(&path)
            .unwrap()
            .write(&sample())
            .unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&dir.path().join("a")), 0o700);
    }

    #[test]
    fn existing_dir_mode_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        HeartbeatWriter::open(dir.path().join("hb.json")).unwrap();
        assert_eq!(mode(dir.path()), 0o755);
    }

    #[test]
    fn path_without_file_name_is_invalid() {
        let e = HeartbeatWriter::open("/").unwrap_err();
        assert!(matches!(e, HeartbeatError::InvalidPath { .. }), "{e:?}");
        assert_eq!(e.path(), Path::new("/"));
    }

    #[test]
    fn symlink_refused_by_open() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("hb.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = HeartbeatWriter::open(&path).unwrap_err();
        assert!(matches!(e, HeartbeatError::SymlinkRefused { .. }), "{e:?}");
        assert!(e.to_string().contains("hb.json"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn symlink_refused_by_write() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("hb.json");
        let mut w = HeartbeatWriter::open(&path).unwrap();
        w.write(&sample()).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let e = w.write(&sample()).unwrap_err();
        assert!(matches!(e, HeartbeatError::SymlinkRefused { .. }), "{e:?}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(dir_entries(dir.path()), ["hb.json", "victim"]);
    }

    #[test]
    fn non_regular_target_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        std::fs::create_dir(&path).unwrap();
        let e = HeartbeatWriter::open(&path).unwrap_err();
        assert!(matches!(e, HeartbeatError::NotRegularFile { .. }), "{e:?}");
        let e = read_at(&path, T0).unwrap_err();
        assert!(matches!(e, HeartbeatError::NotRegularFile { .. }), "{e:?}");
    }

    #[test]
    fn writer_refuses_newer_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        let newer = br#"{"format_version": 2, "service": 17, "shape": "different"}"#;
        std::fs::write(&path, newer).unwrap();
        let e = HeartbeatWriter::open(&path).unwrap_err();
        assert!(
            matches!(
                e,
                HeartbeatError::NewerFormat {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), newer);
    }

    #[test]
    fn writer_overwrites_corrupt_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        std::fs::write(&path, b"{\"format_version\": 1, \"serv").unwrap();
        let mut w = HeartbeatWriter::open(&path).unwrap();
        w.write(&sample()).unwrap();
        assert_eq!(read_at(&path, T0).unwrap().heartbeat, Some(sample()));
    }

    #[test]
    fn failed_write_keeps_previous_and_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        let mut w = HeartbeatWriter::open(&path).unwrap();
        w.write(&sample()).unwrap();
        let before = std::fs::read(&path).unwrap();

        let mut big = sample();
        big.extra.insert(
            "blob".into(),
            serde_json::Value::String("x".repeat(MAX_FILE_SIZE as usize)),
        );
        let e = w.write(&big).unwrap_err();
        assert!(
            matches!(
                e,
                HeartbeatError::TooLarge {
                    limit: MAX_FILE_SIZE,
                    ..
                }
            ),
            "{e:?}"
        );

        // A directory squatting on the temporary name makes opening it fail.
        std::fs::create_dir(dir.path().join(".hb.json.tmp")).unwrap();
        let e = w.write(&sample()).unwrap_err();
        assert!(
            matches!(
                e,
                HeartbeatError::Io {
                    op: "remove stale temporary file",
                    ..
                }
            ),
            "{e:?}"
        );
        std::fs::remove_dir(dir.path().join(".hb.json.tmp")).unwrap();

        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(dir_entries(dir.path()), ["hb.json"]);
    }

    #[test]
    fn missing_file_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let st = read_at(&dir.path().join("nope.json"), T0).unwrap();
        assert_eq!(
            st,
            HeartbeatStatus {
                found: false,
                fresh: false,
                age_secs: None,
                ahead_secs: None,
                pid: None,
                heartbeat: None,
            }
        );
    }

    fn read_bytes(bytes: &[u8]) -> HeartbeatError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        std::fs::write(&path, bytes).unwrap();
        let e = read_at(&path, T0).unwrap_err();
        assert_eq!(e.path(), path);
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        e
    }

    fn valid_bytes() -> Vec<u8> {
        let mut v = serde_json::to_vec(&sample()).unwrap();
        v.push(b'\n');
        v
    }

    #[test]
    fn empty_file_is_truncated() {
        let e = read_bytes(b"");
        assert!(matches!(e, HeartbeatError::Truncated { .. }), "{e:?}");
    }

    #[test]
    fn half_file_is_truncated() {
        let v = valid_bytes();
        let e = read_bytes(&v[..v.len() / 2]);
        assert!(matches!(e, HeartbeatError::Truncated { .. }), "{e:?}");
    }

    #[test]
    fn corrupt_json_is_corrupt() {
        for bad in [
            &b"{\"format_version\": 1,, }"[..],
            b"garbage",
            b"{} trailing",
        ] {
            let e = read_bytes(bad);
            assert!(
                matches!(e, HeartbeatError::Corrupt { .. }),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn wrong_type_is_corrupt() {
        let mut v: serde_json::Value = serde_json::from_slice(&valid_bytes()).unwrap();
        v["pid"] = serde_json::json!("not a number");
        let e = read_bytes(&serde_json::to_vec(&v).unwrap());
        assert!(matches!(e, HeartbeatError::Corrupt { .. }), "{e:?}");
        let e = read_bytes(br#"{"format_version": "1"}"#);
        assert!(matches!(e, HeartbeatError::Corrupt { .. }), "{e:?}");
        let e = read_bytes(b"[1, 2]");
        assert!(matches!(e, HeartbeatError::Corrupt { .. }), "{e:?}");
    }

    #[test]
    fn missing_or_zero_format_version_is_corrupt() {
        let mut v: serde_json::Value = serde_json::from_slice(&valid_bytes()).unwrap();
        v.as_object_mut().unwrap().remove("format_version");
        let e = read_bytes(&serde_json::to_vec(&v).unwrap());
        let HeartbeatError::Corrupt { source, .. } = &e else {
            panic!("{e:?}")
        };
        assert!(source.to_string().contains("format_version"), "{source}");
        v["format_version"] = 0.into();
        let e = read_bytes(&serde_json::to_vec(&v).unwrap());
        assert!(matches!(e, HeartbeatError::Corrupt { .. }), "{e:?}");
    }

    #[test]
    fn newer_version_is_reported_despite_garbage_fields() {
        let e = read_bytes(br#"{"timestamp_unix": "soon", "format_version": 7, "pid": []}"#);
        assert!(
            matches!(
                e,
                HeartbeatError::NewerFormat {
                    found: 7,
                    supported: FORMAT_VERSION,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("format_version 7"), "{e}");
        let e = read_bytes(br#"{"format_version": 99999999999}"#);
        assert!(matches!(
            e,
            HeartbeatError::NewerFormat {
                found: 99_999_999_999,
                ..
            }
        ));
    }

    #[test]
    fn oversized_file_is_too_large() {
        // Valid JSON padded with white space beyond the limit: the size alone must reject it.
        let mut v = valid_bytes();
        v.resize(MAX_FILE_SIZE as usize + 1, b' ');
        let e = read_bytes(&v);
        assert!(
            matches!(
                e,
                HeartbeatError::TooLarge {
                    size,
                    limit: MAX_FILE_SIZE,
                    ..
                } if size == MAX_FILE_SIZE + 1
            ),
            "{e:?}"
        );
        // Exactly at the limit is still read.
        v.truncate(MAX_FILE_SIZE as usize);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        std::fs::write(&path, &v).unwrap();
        assert!(read_at(&path, T0).unwrap().found);
    }

    #[test]
    fn freshness_with_injected_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        HeartbeatWriter::open(&path)
            .unwrap()
            .write(&sample())
            .unwrap();
        let max = DEFAULT_MAX_AGE.as_secs();

        let st = read_at(&path, T0 + max).unwrap();
        assert_eq!((st.fresh, st.age_secs), (true, Some(max)));
        let st = read_at(&path, T0 + max + 1).unwrap();
        assert_eq!((st.fresh, st.age_secs), (false, Some(max + 1)));
        // Stamped in the future: fresh within FUTURE_TOLERANCE, not beyond it.
        let tol = FUTURE_TOLERANCE.as_secs();
        let st = read_at(&path, T0 - tol).unwrap();
        assert_eq!(
            (st.fresh, st.age_secs, st.ahead_secs),
            (true, Some(0), Some(tol))
        );
        let st = read_at(&path, T0 - tol - 1).unwrap();
        assert_eq!(
            (st.fresh, st.age_secs, st.ahead_secs),
            (false, Some(0), Some(tol + 1))
        );
        let st = read_at(&path, T0 - 3600).unwrap();
        assert_eq!((st.fresh, st.ahead_secs), (false, Some(3600)));
        let st = read_at(&path, T0).unwrap();
        assert_eq!((st.fresh, st.ahead_secs), (true, None));
        // A clock before 1970 neither panics nor makes the heartbeat stale.
        let st = read_heartbeat(&path, DEFAULT_MAX_AGE, UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(st.unwrap().age_secs, Some(0));
        // Sub-second max ages compare against whole-second ages.
        let st = read_heartbeat(&path, Duration::from_millis(999), at(T0 + 1)).unwrap();
        assert!(!st.fresh);
        assert!(check_heartbeat(&path, Duration::MAX).unwrap().fresh);
    }

    #[test]
    fn unknown_fields_and_health_values_are_tolerated() {
        let text = br#"{
            "format_version": 1, "service": "svc", "pid": 9, "timestamp_unix": 100,
            "health_status": "rebalancing", "brand_new": {"nested": [1, 2]}
        }"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hb.json");
        std::fs::write(&path, text).unwrap();
        let st = read_at(&path, 100).unwrap();
        let hb = st.heartbeat.unwrap();
        assert_eq!(hb.health_status, HealthStatus::Unknown);
        assert_eq!(hb.health_status.to_string(), "unknown");
        assert_eq!(
            (hb.pid, hb.counter("cycle_count"), hb.started_unix),
            (9, 0, 0)
        );
        assert_eq!(
            hb.counters().count(),
            0,
            "non-integer unknown fields are no counters"
        );
        assert_eq!(hb.invocation_id, None);
        assert!(hb.extra.is_empty());
        // Missing health_status reads as unknown too.
        std::fs::write(
            &path,
            br#"{"format_version": 1, "service": "s", "pid": 1, "timestamp_unix": 1}"#,
        )
        .unwrap();
        assert_eq!(
            read_at(&path, 1).unwrap().heartbeat.unwrap().health_status,
            HealthStatus::Unknown
        );
    }

    #[test]
    fn health_status_serializes_lowercase() {
        for (h, s) in [
            (HealthStatus::Starting, "starting"),
            (HealthStatus::Ok, "ok"),
            (HealthStatus::Degraded, "degraded"),
            (HealthStatus::Stalled, "stalled"),
            (HealthStatus::Stopping, "stopping"),
        ] {
            assert_eq!(serde_json::to_string(&h).unwrap(), format!("\"{s}\""));
            assert_eq!(h.to_string(), s);
            assert_eq!(
                serde_json::from_str::<HealthStatus>(&format!("\"{s}\"")).unwrap(),
                h
            );
        }
    }
}
