//! `tracing` set up for a systemd service: native journald logging when stderr is the journal,
//! readable stderr otherwise.
//!
//! systemd connects a service's stderr to the journal (`StandardError=journal`, the default)
//! and says so in `$JOURNAL_STREAM` (`DEV:INODE` of that stream, see
//! [systemd.exec(5)](https://www.freedesktop.org/software/systemd/man/latest/systemd.exec.html#%24JOURNAL_STREAM)).
//! [`init`] upgrades to the native journal protocol (structured fields, priorities,
//! `SYSLOG_IDENTIFIER=`) only when `fstat(2)` of stderr matches `$JOURNAL_STREAM`
//! ([`stderr_is_journal`]); a variable inherited from a parent service is ignored that way.
//!
//! | situation                                   | result                                   |
//! |---------------------------------------------|------------------------------------------|
//! | stderr is the journal, journald reachable   | [`LogTarget::Journald`]                  |
//! | stderr is the journal, journald unreachable | `Stderr { timestamps: false }`, one warn |
//! | anything else                               | `Stderr { timestamps: true }`            |
//!
//! Without the native protocol, the journal still records stderr lines with its own
//! timestamps, so none are printed then. ANSI colours are used only when stderr is a terminal.
//!
//! ```no_run
//! use watchkeeper::{SystemdEnv, logging::{LogConfig, init}};
//! let env = SystemdEnv::from_env();
//! let target = init(&LogConfig::from_rust_log("my-service"), &env)?;
//! tracing::info!(?target, "started");
//! # Ok::<(), watchkeeper::logging::LoggingError>(())
//! ```
//!
//! # Caveats
//!
//! - [`init`] installs the process-wide default subscriber; a second call (or any other
//!   subscriber set before) gives [`LoggingError::AlreadyInitialized`].
//! - The filter is fixed at [`init`]: [`LogConfig::from_rust_log`] reads `RUST_LOG` once, and
//!   an empty filter means "use the default directive".
//! - The journald fallback warning is an ordinary `warn` event with target
//!   `watchkeeper::logging`: a filter that hides it hides it.
//! - Only stderr is compared with `$JOURNAL_STREAM` (systemd points it at stderr when stdout
//!   and stderr are separate streams), as libsystemd-rs and go-systemd do.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::filter::{Directive, EnvFilter, ParseError};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::{SubscriberInitExt, TryInitError};
use tracing_subscriber::{Layer, Registry};

use crate::SystemdEnv;
use crate::env::JournalStream;

/// The filter used when none is given.
pub const DEFAULT_DIRECTIVE: &str = "info";

/// Where [`init`] sends events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogTarget {
    /// The native journal protocol, with structured fields and `SYSLOG_IDENTIFIER=`.
    Journald,
    /// Human-readable lines on stderr.
    Stderr {
        /// Whether lines start with a timestamp (not when the journal adds its own).
        timestamps: bool,
    },
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoggingError {
    /// A filter directive does not parse.
    #[error("invalid log filter directive {directive:?} in {origin} {filter:?}: {source}")]
    InvalidFilter {
        /// Where the filter came from: `RUST_LOG`, `the configured filter` or
        /// `the default directive`.
        origin: &'static str,
        /// The whole filter.
        filter: String,
        /// The directive that does not parse.
        directive: String,
        /// What is wrong with it.
        #[source]
        source: ParseError,
    },
    /// A global `tracing` subscriber is already set.
    #[error("a global tracing subscriber is already set; call logging::init once, early in main")]
    AlreadyInitialized {
        /// The error from `tracing-subscriber`.
        #[source]
        source: TryInitError,
    },
}

/// What [`init`] sets up. Build it with [`LogConfig::new`] or [`LogConfig::from_rust_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct LogConfig {
    identifier: String,
    default_directive: String,
    filter: Option<String>,
    filter_origin: &'static str,
}

impl LogConfig {
    /// A configuration logging as `identifier` (`SYSLOG_IDENTIFIER=` in the journal), with the
    /// default filter [`DEFAULT_DIRECTIVE`].
    pub fn new(identifier: impl Into<String>) -> Self {
        Self {
            identifier: identifier.into(),
            default_directive: DEFAULT_DIRECTIVE.to_owned(),
            filter: None,
            filter_origin: "the configured filter",
        }
    }

    /// [`LogConfig::new`] with the filter read, once, from `RUST_LOG` (lossily converted to
    /// UTF-8). This is the only place the crate reads the environment outside
    /// [`SystemdEnv::from_env`].
    pub fn from_rust_log(identifier: impl Into<String>) -> Self {
        let filter = std::env::var_os("RUST_LOG").map(|v| v.to_string_lossy().into_owned());
        let mut config = Self::new(identifier).with_filter(filter);
        config.filter_origin = "RUST_LOG";
        config
    }

    /// The filter used when no explicit one is set (or it is empty), in `EnvFilter` syntax,
    /// e.g. `info` or `info,hyper=warn`. Default: [`DEFAULT_DIRECTIVE`].
    pub fn with_default_directive(mut self, directive: &str) -> Self {
        self.default_directive = directive.to_owned();
        self
    }

    /// An explicit filter in `EnvFilter` syntax, replacing the default directive entirely;
    /// `None` or an empty string keeps the default.
    pub fn with_filter(mut self, filter: Option<String>) -> Self {
        self.filter = filter;
        self.filter_origin = "the configured filter";
        self
    }

    /// The `SYSLOG_IDENTIFIER=`.
    pub fn identifier(&self) -> &str {
        &self.identifier
    }

    /// The filter [`init`] will use, and where it comes from.
    fn effective_filter(&self) -> (&'static str, &str) {
        match self.filter.as_deref() {
            Some(f) if !f.trim().is_empty() => (self.filter_origin, f),
            _ => ("the default directive", &self.default_directive),
        }
    }

    /// Parses the effective filter, naming the first directive that does not parse.
    fn build_filter(&self) -> Result<EnvFilter, LoggingError> {
        let (origin, filter) = self.effective_filter();
        let invalid = |directive: &str, source| LoggingError::InvalidFilter {
            origin,
            filter: filter.to_owned(),
            directive: directive.to_owned(),
            source,
        };
        for directive in filter.split(',').filter(|d| !d.is_empty()) {
            directive
                .parse::<Directive>()
                .map_err(|e| invalid(directive, e))?;
        }
        EnvFilter::builder()
            .parse(filter)
            .map_err(|e| invalid(filter, e))
    }
}

/// Whether stderr is the journal stream systemd announced: `$JOURNAL_STREAM` parses and equals
/// `(st_dev, st_ino)` of `fstat(2)` on fd 2. False when unset, malformed, or another stream
/// (e.g. inherited from a parent service while stderr was redirected).
pub fn stderr_is_journal(env: &SystemdEnv) -> bool {
    let Ok(Some(stream)) = env.journal_stream() else {
        return false;
    };
    rustix::fs::fstat(std::io::stderr().as_fd()).is_ok_and(|st| stat_is(&st, stream))
}

/// Whether `st` is the file `stream` names.
fn stat_is(st: &rustix::fs::Stat, stream: JournalStream) -> bool {
    // The field types differ between architectures.
    #[allow(clippy::useless_conversion)]
    let dev = u64::try_from(st.st_dev).ok();
    #[allow(clippy::useless_conversion)]
    let ino = u64::try_from(st.st_ino).ok();
    dev == Some(stream.dev) && ino == Some(stream.ino)
}

/// The target [`init`] tries first: [`LogTarget::Journald`] when [`stderr_is_journal`], else
/// stderr with timestamps. [`init`] may still fall back when journald is unreachable.
pub fn choose_target(env: &SystemdEnv) -> LogTarget {
    if stderr_is_journal(env) {
        LogTarget::Journald
    } else {
        LogTarget::Stderr { timestamps: true }
    }
}

type BoxedLayer =
    Box<dyn Layer<tracing_subscriber::layer::Layered<EnvFilter, Registry>> + Send + Sync>;

fn stderr_layer(timestamps: bool) -> BoxedLayer {
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if timestamps {
        layer.boxed()
    } else {
        layer.without_time().boxed()
    }
}

/// Installs the global `tracing` subscriber for `config`, choosing the target as the
/// [module documentation](self) describes, and returns the target in use.
///
/// # Errors
///
/// [`LoggingError::InvalidFilter`] (nothing is installed then) or
/// [`LoggingError::AlreadyInitialized`].
pub fn init(config: &LogConfig, env: &SystemdEnv) -> Result<LogTarget, LoggingError> {
    let filter = config.build_filter()?;
    let (layer, target, journald_error) = match choose_target(env) {
        LogTarget::Journald => match tracing_journald::layer() {
            Ok(journald) => (
                journald
                    .with_syslog_identifier(config.identifier.clone())
                    .boxed(),
                LogTarget::Journald,
                None,
            ),
            Err(e) => (
                stderr_layer(false),
                LogTarget::Stderr { timestamps: false },
                Some(e),
            ),
        },
        LogTarget::Stderr { .. } => (
            stderr_layer(true),
            LogTarget::Stderr { timestamps: true },
            None,
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .map_err(|source| LoggingError::AlreadyInitialized { source })?;
    if let Some(error) = journald_error {
        tracing::warn!(
            "native journald logging unavailable ({error}), so logging plain lines to stderr, \
             which is the journal stream; the journal timestamps them"
        );
    }
    if let Err(error) = env.journal_stream() {
        tracing::warn!("ignoring malformed JOURNAL_STREAM: {error}");
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stderr_dev_ino() -> (u64, u64) {
        let st = rustix::fs::fstat(std::io::stderr().as_fd()).unwrap();
        #[allow(clippy::useless_conversion)]
        (
            u64::try_from(st.st_dev).unwrap(),
            u64::try_from(st.st_ino).unwrap(),
        )
    }

    fn journal_env(value: &str) -> SystemdEnv {
        SystemdEnv::from_vars([("JOURNAL_STREAM", value)])
    }

    #[test]
    fn stderr_is_journal_when_dev_ino_match() {
        let (dev, ino) = stderr_dev_ino();
        let env = journal_env(&format!("{dev}:{ino}"));
        assert!(stderr_is_journal(&env));
        assert_eq!(choose_target(&env), LogTarget::Journald);
    }

    #[test]
    fn stderr_is_not_journal_for_other_stream() {
        let (dev, ino) = stderr_dev_ino();
        for other in [
            format!("{dev}:{}", ino.wrapping_add(1)),
            format!("{}:{ino}", dev.wrapping_add(1)),
        ] {
            let env = journal_env(&other);
            assert!(!stderr_is_journal(&env), "{other}");
            assert_eq!(choose_target(&env), LogTarget::Stderr { timestamps: true });
        }
    }

    #[test]
    fn stderr_is_not_journal_when_unset_or_malformed() {
        assert!(!stderr_is_journal(&SystemdEnv::default()));
        let (dev, ino) = stderr_dev_ino();
        for bad in [
            format!("{dev}"),
            format!("{dev}:{ino}:0"),
            format!("{dev}:x{ino}"),
            format!(" {dev}:{ino}"),
            String::new(),
        ] {
            assert!(!stderr_is_journal(&journal_env(&bad)), "{bad:?}");
        }
    }

    #[test]
    fn stat_is_compares_both_fields() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let st = rustix::fs::fstat(&f).unwrap();
        #[allow(clippy::useless_conversion)]
        let (dev, ino) = (
            u64::try_from(st.st_dev).unwrap(),
            u64::try_from(st.st_ino).unwrap(),
        );
        assert!(stat_is(&st, JournalStream { dev, ino }));
        assert!(!stat_is(&st, JournalStream { dev, ino: ino + 1 }));
        assert!(!stat_is(&st, JournalStream { dev: dev + 1, ino }));
    }

    #[test]
    fn invalid_filter_names_directive_and_origin_without_installing() {
        let config = LogConfig::new("t").with_filter(Some("info,my_crate=loud".into()));
        let e = init(&config, &SystemdEnv::default()).unwrap_err();
        match &e {
            LoggingError::InvalidFilter {
                origin,
                filter,
                directive,
                ..
            } => {
                assert_eq!(*origin, "the configured filter");
                assert_eq!(filter, "info,my_crate=loud");
                assert_eq!(directive, "my_crate=loud");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("\"my_crate=loud\""), "{e}");

        let config = LogConfig::new("t").with_default_directive("warn,[=");
        let e = init(&config, &SystemdEnv::default()).unwrap_err();
        assert!(
            matches!(&e, LoggingError::InvalidFilter { origin: "the default directive", directive, .. } if directive == "[="),
            "{e:?}"
        );
    }

    #[test]
    fn effective_filter_prefers_non_empty_explicit_filter() {
        let c = LogConfig::new("id").with_default_directive("debug");
        assert_eq!(c.effective_filter(), ("the default directive", "debug"));
        let c = c.with_filter(Some("  ".into()));
        assert_eq!(c.effective_filter(), ("the default directive", "debug"));
        let c = c.with_filter(Some("trace".into()));
        assert_eq!(c.effective_filter(), ("the configured filter", "trace"));
        assert_eq!(c.identifier(), "id");
        assert!(c.build_filter().is_ok());
        let c = LogConfig::new("id").with_default_directive("info,hyper=warn,my_crate[span]=debug");
        assert!(c.build_filter().is_ok());
    }
}
