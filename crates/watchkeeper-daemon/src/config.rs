//! The daemon's configuration file (`--config PATH`, TOML), read at start and on every `SIGHUP`.
//!
//! ```toml
//! lease_secs = 60            # a claim's lease; renew within it or the job is queued again
//! max_attempts = 3           # a job whose lease expires this many times is quarantined
//! allowed_uids = [1001]      # uids allowed to connect, besides root and the daemon's own
//! status_interval_secs = 5   # how often STATUS= is refreshed (when the counts changed)
//! keep_finished_secs = 604800  # finished jobs are deleted this long after they finished (0: never)
//! keep_finished_max = 1000000  # and beyond this many finished jobs, the oldest (0: no limit)
//! ```
//!
//! Every key is optional and unknown keys are errors. Errors are one line ("PATH:LINE:COLUMN:
//! what"), because a failed reload is shown in `STATUS=`, which cannot hold a newline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::Policy;

/// The overflow uid (`nobody`): a user namespace shows every unmapped user as this uid, so a
/// peer with it could be anyone. It is never allowed, whatever the configuration says.
pub const NOBODY_UID: u32 = 65534;

/// Why [`NOBODY_UID`] cannot be allowed, for error messages.
pub const NOBODY_PROBLEM: &str = "uid 65534 is nobody, the overflow uid that user namespaces map unknown users to, and is never allowed";

/// The largest configuration file [`Config::load`] reads, in bytes (1 MiB).
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;

/// The daemon's tunables. [`Config::default`] is what runs without a file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A claim's (and a renewal's) lease in seconds, at least 1. Default 60.
    pub lease_secs: u64,
    /// A job whose lease expires with this many attempts used is quarantined as poison; at
    /// least 1. Default 3.
    pub max_attempts: u32,
    /// Uids allowed to connect besides root and the daemon's own (added to `--allow-uid`).
    /// Default none.
    pub allowed_uids: Vec<u32>,
    /// How often `STATUS=` is refreshed when the counts changed, 1 to 3600 seconds. Default 5.
    pub status_interval_secs: u64,
    /// Finished jobs (completed, failed, denied, quarantined) are deleted this many seconds
    /// after they finished; 0 keeps them. Default 7 days.
    pub keep_finished_secs: u64,
    /// At most this many finished jobs are kept, the oldest deleted first; 0 is no limit.
    /// Default 1,000,000.
    pub keep_finished_max: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_secs: 60,
            max_attempts: 3,
            allowed_uids: Vec::new(),
            status_interval_secs: 5,
            keep_finished_secs: 7 * 24 * 3600,
            keep_finished_max: 1_000_000,
        }
    }
}

/// The configuration file could not be used. Every message is a single line naming the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Config`].
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error (0 if unknown).
        line: usize,
        /// 1-based column, in characters (0 if unknown).
        column: usize,
        /// What is wrong, on one line.
        message: String,
    },
    /// A value is out of range.
    #[error("{path}: {key} = {value} is invalid: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        problem: &'static str,
    },
}

impl Config {
    /// Reads and checks the file at `path`.
    ///
    /// Only a regular file of at most [`MAX_CONFIG_SIZE`] bytes is read, opened so that it
    /// cannot block (a FIFO is an error, not a hang; `/dev/zero` is an error, not an endless
    /// read).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = watchkeeper::fsutil::read_regular_file_bounded(path, MAX_CONFIG_SIZE)
            .map_err(read_err)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not valid UTF-8",
            ))
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and checks `text`; `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((0, 0));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: one_line_message(text, &e),
            }
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, value, problem| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            value,
            problem,
        };
        if self.lease_secs == 0 {
            return Err(invalid("lease_secs", 0, "must be at least 1"));
        }
        if self.max_attempts == 0 {
            return Err(invalid("max_attempts", 0, "must be at least 1"));
        }
        if self.allowed_uids.contains(&NOBODY_UID) {
            return Err(invalid(
                "allowed_uids",
                u64::from(NOBODY_UID),
                NOBODY_PROBLEM,
            ));
        }
        if !(1..=3600).contains(&self.status_interval_secs) {
            return Err(invalid(
                "status_interval_secs",
                self.status_interval_secs,
                "must be between 1 and 3600",
            ));
        }
        Ok(())
    }

    /// The lease rules for the store.
    pub fn policy(&self) -> Policy {
        Policy {
            lease_secs: self.lease_secs,
            max_attempts: self.max_attempts,
        }
    }

    /// [`Config::status_interval_secs`] as a duration.
    pub fn status_interval(&self) -> Duration {
        Duration::from_secs(self.status_interval_secs)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
/// The parser's message on one line, followed by the offending line of the file when the
/// parser pointed at one (a wrong type names no key: `invalid type: string "soon", expected
/// u64 in `poll_interval_ms = "soon"``).
fn one_line_message(text: &str, e: &toml::de::Error) -> String {
    let mut message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let source_line = e.span().and_then(|span| {
        let start = text.get(..span.start)?.rfind('\n').map_or(0, |i| i + 1);
        let line = text.get(start..)?.lines().next()?.trim();
        (!line.is_empty()).then(|| line.chars().take(80).collect::<String>())
    });
    if let Some(line) = source_line {
        message.push_str(&format!(" in `{line}`"));
    }
    message
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/wk.toml"))
    }

    #[test]
    fn every_key_is_optional() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = parse("lease_secs = 5\nallowed_uids = [1000, 1001]").unwrap();
        assert_eq!(c.lease_secs, 5);
        assert_eq!(c.allowed_uids, vec![1000, 1001]);
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.status_interval(), Duration::from_secs(5));
        assert_eq!(
            c.policy(),
            Policy {
                lease_secs: 5,
                max_attempts: 3
            }
        );
    }

    #[test]
    fn errors_are_one_line_and_name_file_line_and_key() {
        let e = parse("lease_secs = 5\nbogus = 1\n").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("/etc/wk.toml:2:1: unknown field `bogus`"),
            "{msg}"
        );
        let e = parse("lease_secs = \"soon\"").unwrap_err().to_string();
        assert!(e.starts_with("/etc/wk.toml:1:14: "), "{e}");
        assert!(e.contains("string"), "{e}");
        let e = parse("lease_secs = [").unwrap_err().to_string();
        assert!(e.starts_with("/etc/wk.toml:1:"), "{e}");
        for text in [
            "lease_secs = 0",
            "max_attempts = 0",
            "status_interval_secs = 0",
        ] {
            let e = parse(text).unwrap_err().to_string();
            let key = text.split(' ').next().unwrap();
            assert!(e.contains(key) && e.contains("/etc/wk.toml"), "{e}");
        }
        for text in [
            "bogus = 1",
            "lease_secs = -1",
            "x = [",
            "allowed_uids = [\"root\"]",
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e:?}");
        }
    }

    #[test]
    fn the_overflow_uid_cannot_be_allowed() {
        let e = parse("allowed_uids = [1000, 65534]")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/wk.toml: allowed_uids = 65534 is invalid: uid 65534 is nobody"),
            "{e}"
        );
        assert!(parse("allowed_uids = [65533]").is_ok());
    }

    #[test]
    fn an_unreadable_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/wk.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/wk.toml"), "{e}");
    }

    #[test]
    fn a_fifo_dev_zero_or_an_oversize_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let big = dir.path().join("big.toml");
        let mut text = "lease_secs = 5\n".to_owned();
        text.push_str(&"#".repeat(usize::try_from(MAX_CONFIG_SIZE).unwrap()));
        std::fs::write(&big, text).unwrap();
        // On another thread, so that a blocking open fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo.clone(), PathBuf::from("/dev/zero"), big.clone()];
        std::thread::spawn(move || {
            let _ = tx.send(paths.map(|p| Config::load(&p)));
        });
        let [fifo_e, zero_e, big_e] = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("Config::load blocked");
        let line = |r: Result<Config, ConfigError>| crate::error_chain(&r.unwrap_err());
        assert_eq!(
            line(fifo_e),
            format!(
                "cannot read the configuration {0}: {0} is a FIFO, not a regular file",
                fifo.display()
            )
        );
        assert!(line(zero_e).ends_with("/dev/zero is a character device, not a regular file"));
        assert!(line(big_e).ends_with(&format!("is larger than {MAX_CONFIG_SIZE} bytes")));
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncdé", 0), (1, 1));
        assert_eq!(line_column("ab\ncdé", 3), (2, 1));
        assert_eq!(line_column("ab\nédx", 6), (2, 3));
    }
}
