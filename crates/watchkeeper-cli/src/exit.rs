//! Exit codes: an API. Scripts and probes depend on them; they never change meaning.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | healthy / success (`status`, `probe`, `doctor` without findings, operations that worked) |
//! | 1 | degraded (`status`, `metrics` is never degraded) |
//! | 2 | unhealthy (`status`), probe failed (`probe`) |
//! | 3 | could not ask: no service manager, no socket, unreadable file; `status` with facts the caller may not read, the rest healthy |
//! | 4 | `doctor` found something (one line per finding on stdout) |
//! | 5 | an operation failed (`install`, `uninstall`, `rollback`, `backup`, `restore`, `metrics --textfile`) |
//! | 6 | refused: the operation would overwrite a local change or hit a running daemon (`--force`, or stop it) |
//! | 64 | usage: bad command line (clap's own errors, `EX_USAGE`) |

/// Healthy, or the operation succeeded.
pub(crate) const OK: u8 = 0;
/// At least one service is degraded, none unhealthy.
pub(crate) const DEGRADED: u8 = 1;
/// At least one service is unhealthy; or the probe failed.
pub(crate) const UNHEALTHY: u8 = 2;
/// The service manager, the socket or a file could not be asked.
pub(crate) const CANNOT_ASK: u8 = 3;
/// An operation failed.
pub(crate) const FAILED: u8 = 5;
/// `doctor` has findings.
pub(crate) const FINDINGS: u8 = 4;
/// The operation was refused (a local change, a running daemon).
pub(crate) const REFUSED: u8 = 6;
/// Bad command line.
pub(crate) const USAGE: u8 = 64;

/// An error that carries its exit code; [`anyhow`] errors without one exit with [`FAILED`].
#[derive(Debug)]
pub(crate) struct Coded {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

/// An error with exit code `code`.
pub(crate) fn coded(code: u8, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Coded {
        code,
        message: message.into(),
    })
}

/// The exit code an error stands for.
pub(crate) fn code_of(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| c.downcast_ref::<Coded>())
        .map_or(FAILED, |c| c.code)
}

/// An error and its causes on one line (`heartbeat file X: open failed: Permission denied`),
/// whitespace runs (a TOML error's line breaks) folded into one space.
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
