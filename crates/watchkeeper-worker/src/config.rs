//! The worker's configuration file (TOML).
//!
//! ```toml
//! # Programs a job may run, compared exactly with the job's command[0]:
//! # "echo" allows ["echo", ...] but not ["/bin/echo", ...].
//! allowlist = ["echo", "/usr/bin/true", "sh"]
//! poll_interval_ms = 500   # how often an idle worker asks for a job
//! grace_secs = 10          # on SIGTERM, how long a running job may take before it is released
//! backoff_max_ms = 5000    # longest wait between reconnection attempts
//! # Credentials a job may ask for by name (from the unit's LoadCredential=); default none.
//! credentials = ["github-token"]
//! ```
//!
//! Every key is optional; unknown keys are errors, so that a typo does not go unnoticed.
//! Without a configuration file the allowlist is empty and every job is denied.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default for [`Config::poll_interval_ms`].
pub const DEFAULT_POLL_INTERVAL_MS: u64 = 500;
/// Default for [`Config::grace_secs`].
pub const DEFAULT_GRACE_SECS: u64 = 10;
/// Default for [`Config::backoff_max_ms`].
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 5000;
/// The first wait before reconnecting to a lost daemon; it doubles up to
/// [`Config::backoff_max_ms`].
pub const BACKOFF_INITIAL_MS: u64 = 100;
/// Upper bound of `poll_interval_ms` and `backoff_max_ms` (one hour).
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// The largest configuration file read, in bytes (1 MiB).
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;
/// Upper bound of `grace_secs` (one hour).
pub const MAX_GRACE_SECS: u64 = 3_600;

/// The worker's settings, as read from the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Programs a job may run, compared exactly with its `command[0]`.
    pub allowlist: Vec<String>,
    /// How often an idle worker asks for a job, and the longest time between two cycles of
    /// the poll loop, in milliseconds.
    pub poll_interval_ms: u64,
    /// On `SIGTERM`, how long a running job may take to finish before it is killed and released.
    pub grace_secs: u64,
    /// Longest wait between two attempts to reconnect to the daemon, in milliseconds.
    pub backoff_max_ms: u64,
    /// Credentials (names in `$CREDENTIALS_DIRECTORY`, from the unit's `LoadCredential=`) a
    /// job may ask for in its spec; a job that asks for another is denied.
    pub credentials: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allowlist: Vec::new(),
            poll_interval_ms: DEFAULT_POLL_INTERVAL_MS,
            grace_secs: DEFAULT_GRACE_SECS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
            credentials: Vec::new(),
        }
    }
}

/// A configuration file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error from the system.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has unknown keys or values of the wrong type. The
    /// message is one line (the parser's own spans several, with a drawing of the spot).
    #[error("config file {}:{line}:{column}: invalid TOML: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where the parser stopped, from 1 (0 when it did not say).
        line: usize,
        /// The column in that line, in characters, from 1 (0 when the parser did not say).
        column: usize,
        /// What the parser found, on one line.
        message: String,
    },
    /// A value is out of range.
    #[error("config file {}: {key} = {value}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `poll_interval_ms`.
        key: &'static str,
        /// The value found, as written in TOML.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl Config {
    /// Reads and checks the configuration file at `path`. Only a regular file of at most
    /// [`MAX_CONFIG_SIZE`] bytes is read, opened so that it cannot block: a FIFO is an error,
    /// not a hang, and `/dev/zero` an error, not an endless read.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
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
        Self::parse(&text, path)
    }

    /// Parses and checks `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((0, 0), |span| line_column(text, span.start));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: one_line_message(text, &e),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every value's range; `path` is only used in error messages.
    pub fn validate(&self, path: impl AsRef<Path>) -> Result<(), ConfigError> {
        let invalid = |key, value: String, reason| ConfigError::Invalid {
            path: path.as_ref().to_owned(),
            key,
            value,
            reason,
        };
        if !(1..=MAX_INTERVAL_MS).contains(&self.poll_interval_ms) {
            return Err(invalid(
                "poll_interval_ms",
                self.poll_interval_ms.to_string(),
                "must be between 1 and 3600000",
            ));
        }
        if !(BACKOFF_INITIAL_MS..=MAX_INTERVAL_MS).contains(&self.backoff_max_ms) {
            return Err(invalid(
                "backoff_max_ms",
                self.backoff_max_ms.to_string(),
                "must be between 100 and 3600000",
            ));
        }
        if self.grace_secs > MAX_GRACE_SECS {
            return Err(invalid(
                "grace_secs",
                self.grace_secs.to_string(),
                "must be at most 3600",
            ));
        }
        for program in &self.allowlist {
            if program.is_empty() || program.contains('\0') {
                return Err(invalid(
                    "allowlist",
                    format!("{program:?}"),
                    "entries must be non-empty and without NUL bytes",
                ));
            }
        }
        for name in &self.credentials {
            if !crate::secrets::name_valid(name) {
                return Err(invalid(
                    "credentials",
                    format!("{name:?}"),
                    "entries must be credential names: 1 to 255 bytes, without '/', not . or ..",
                ));
            }
        }
        Ok(())
    }

    /// Whether a job may be handed credential `name`.
    pub fn allows_credential(&self, name: &str) -> bool {
        self.credentials.iter().any(|c| c == name)
    }

    /// Whether a job may run `program` (its `command[0]`): an exact match with an entry.
    pub fn allows(&self, program: &str) -> bool {
        self.allowlist.iter().any(|p| p == program)
    }

    /// [`Config::poll_interval_ms`] as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// [`Config::grace_secs`] as a duration.
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.grace_secs)
    }

    /// [`Config::backoff_max_ms`] as a duration.
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
}

/// The line and column (both from 1, the column in characters) of byte `offset` in `text`.
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

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::parse("", "w.toml").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.poll_interval(), Duration::from_millis(500));
        assert_eq!(c.grace(), Duration::from_secs(10));
        assert_eq!(c.backoff_max(), Duration::from_secs(5));
        assert!(!c.allows("echo"));
    }

    #[test]
    fn full_file_parses_and_matches_exactly() {
        let c = Config::parse(
            r#"
            allowlist = ["echo", "/usr/bin/true"]
            poll_interval_ms = 50
            grace_secs = 0
            backoff_max_ms = 100
            "#,
            "w.toml",
        )
        .unwrap();
        assert_eq!(c.poll_interval_ms, 50);
        assert_eq!(c.grace_secs, 0);
        assert_eq!(c.backoff_max_ms, 100);
        assert!(c.allows("echo"));
        assert!(c.allows("/usr/bin/true"));
        for other in ["/bin/echo", "true", "echo ", "ECHO", ""] {
            assert!(!c.allows(other), "{other:?}");
        }
    }

    #[test]
    fn errors_name_the_file_and_the_key() {
        let cases = [
            ("poll_interval_ms = 0", "poll_interval_ms = 0"),
            ("backoff_max_ms = 99", "backoff_max_ms = 99"),
            ("grace_secs = 3601", "grace_secs = 3601"),
            (r#"allowlist = ["echo", ""]"#, r#"allowlist = """#),
            (r#"credentials = ["a/b"]"#, r#"credentials = "a/b""#),
        ];
        for (text, expected) in cases {
            let e = Config::parse(text, "/etc/wk/worker.toml").unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with("config file /etc/wk/worker.toml: "),
                "{msg}"
            );
            assert!(msg.contains(expected), "{text}: {msg}");
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_parse_errors() {
        for text in [
            "poll_interval = 5",
            "allowlist = \"echo\"",
            "grace_secs = -1",
            "[x",
        ] {
            let e = Config::parse(text, "w.toml").unwrap_err();
            assert!(
                matches!(e, ConfigError::Parse { line: 1, .. }),
                "{text}: {e:?}"
            );
            let msg = crate::chain(&e);
            assert!(msg.starts_with("config file w.toml:1:"), "{text}: {msg}");
            assert!(msg.contains(": invalid TOML: "), "{text}: {msg}");
            assert!(!msg.contains('\n'), "{text}: {msg}");
        }
        // A wrong type names no key in the parser's message: the offending line does.
        let e =
            Config::parse("grace_secs = 1\npoll_interval_ms = \"soon\"\n", "w.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file w.toml:2:20: invalid TOML: invalid type: string \"soon\", expected u64 \
             in `poll_interval_ms = \"soon\"`"
        );
        let e = Config::parse("poll_interval_ms = 5\nbogus = 1\n", "w.toml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file w.toml:2:1: invalid TOML: unknown field `bogus`"),
            "{e}"
        );
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        // /dev/zero would be read forever; a FIFO would block the open.
        let e = Config::load("/dev/zero").unwrap_err();
        let msg = crate::chain(&e);
        assert!(msg.contains("not a regular file"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let msg = crate::chain(&Config::load(&fifo).unwrap_err());
        assert!(msg.contains("not a regular file"), "{msg}");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "#".repeat(MAX_CONFIG_SIZE as usize + 1)).unwrap();
        let msg = crate::chain(&Config::load(&big).unwrap_err());
        assert!(msg.contains("larger than"), "{msg}");
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let e = Config::load(&path).unwrap_err();
        assert!(matches!(&e, ConfigError::Read { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound));
        assert!(e.to_string().contains("absent.toml"), "{e}");
    }
}
