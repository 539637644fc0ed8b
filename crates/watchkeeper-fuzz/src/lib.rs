//! The fuzz targets of watchkeeper as plain functions of `&[u8]`: the cargo-fuzz targets in
//! `fuzz/` (nightly, libFuzzer) call them, and `tests/corpus.rs` replays every input of
//! `fuzz/corpus/<target>/` through them under an ordinary `cargo test` on stable, so that CI
//! checks the corpora, and every crash input added there, without a nightly toolchain.
//!
//! Each target feeds the input to a parser that meets untrusted bytes and checks what must
//! hold whatever the input: no panic, and the properties noted on each function. A broken
//! property panics, which is what the fuzzer reports as a crash.
#![deny(missing_docs)]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A fuzz target.
pub type Target = fn(&[u8]);

/// The targets, by the name of their corpus directory and cargo-fuzz binary.
pub const TARGETS: &[(&str, Target)] = &[
    ("env", env),
    ("heartbeat", heartbeat),
    ("job_protocol", job_protocol),
    ("worker_config", worker_config),
    ("daemon_config", daemon_config),
];

/// The supervision environment: the input is `NAME=VALUE` lines (any bytes), read as
/// [`watchkeeper::SystemdEnv`] and through each of its accessors; the whole input is also
/// parsed as a `NOTIFY_SOCKET` value. A parsed address prints as a value that parses back to
/// itself.
pub fn env(data: &[u8]) {
    use watchkeeper::{NotifyAddr, SystemdEnv};
    let vars = data.split(|&b| b == b'\n').filter_map(|line| {
        let eq = line.iter().position(|&b| b == b'=')?;
        let (name, value) = (&line[..eq], &line[eq + 1..]);
        let name = std::str::from_utf8(name).ok()?;
        Some((name.to_owned(), OsStr::from_bytes(value).to_owned()))
    });
    let env = SystemdEnv::from_vars(vars);
    let _ = env.is_supervised();
    let _ = env.watchdog(std::process::id());
    let _ = env.watchdog(1);
    let _ = env.journal_stream();
    let _ = env.credentials_directory();
    let _ = env.invocation_id();
    if let Ok(Some(addr)) = env.notify_socket() {
        roundtrip_addr(&addr);
    }
    if let Ok(addr) = NotifyAddr::parse(OsStr::from_bytes(data)) {
        roundtrip_addr(&addr);
    }
}

fn roundtrip_addr(addr: &watchkeeper::NotifyAddr) {
    // Only the printable forms: an abstract name or a path with bytes that are not UTF-8 is
    // shown lossily.
    let shown = addr.to_string();
    if let watchkeeper::NotifyAddr::Vsock { .. } = addr {
        let back = watchkeeper::NotifyAddr::parse(OsStr::new(&shown))
            .unwrap_or_else(|e| panic!("{shown:?} does not parse back: {e}"));
        assert_eq!(&back, addr, "{shown:?}");
    }
}

/// The heartbeat reader, on a real file holding the input: no panic, and a heartbeat it
/// accepts is accepted again after it is written back by [`watchkeeper::heartbeat`]'s writer.
pub fn heartbeat(data: &[u8]) {
    use watchkeeper::heartbeat::{HeartbeatWriter, read_heartbeat};
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("heartbeat.json");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let now = SystemTime::now();
    let Ok(status) = read_heartbeat(&path, Duration::from_secs(120), now) else {
        return;
    };
    let Some(hb) = status.heartbeat else {
        panic!("found a file but returned no heartbeat")
    };
    assert!(status.found);
    let again = dir.path().join("again.json");
    let mut writer = HeartbeatWriter::open(&again).unwrap_or_else(|e| panic!("open: {e}"));
    writer
        .write(&hb)
        .unwrap_or_else(|e| panic!("an accepted heartbeat cannot be written back: {e}"));
    let back = read_heartbeat(&again, Duration::from_secs(120), now)
        .unwrap_or_else(|e| panic!("a heartbeat written back does not read: {e}"));
    assert_eq!(back.heartbeat.as_ref(), Some(&hb));
}

/// The job protocol: the input as one request line and as one response line (as the daemon and
/// the client read them), and as a job spec. A request or response that parses serialises to a
/// line that parses back to the same value; a spec that parses passes its own checks again.
pub fn job_protocol(data: &[u8]) {
    use watchkeeper_jobs::{JobSpec, Request, Response};
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let line = serde_json::to_string(&req).unwrap_or_else(|e| panic!("{req:?}: {e}"));
        assert!(!line.contains('\n'), "{line}");
        let back: Request =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line} does not parse: {e}"));
        assert_eq!(back, req, "{line}");
    }
    if let Ok(resp) = serde_json::from_slice::<Response>(data) {
        let line = serde_json::to_string(&resp).unwrap_or_else(|e| panic!("{resp:?}: {e}"));
        let back: Response =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line} does not parse: {e}"));
        assert_eq!(back, resp, "{line}");
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data)
        && let Ok(spec) = JobSpec::parse(&value)
    {
        let again = JobSpec::parse(&spec.to_value())
            .unwrap_or_else(|e| panic!("{spec:?} does not parse back: {e}"));
        assert_eq!(again, spec);
    }
}

/// The worker's TOML configuration: an accepted configuration passes its checks again; an
/// error is one line naming the file.
pub fn worker_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match watchkeeper_worker::Config::parse(text, "worker.toml") {
        Ok(config) => {
            if let Err(e) = config.validate("worker.toml") {
                panic!("accepted, then refused: {e}");
            }
        }
        Err(e) => one_line(&watchkeeper_worker::chain(&e), "config file worker.toml"),
    }
}

/// The daemon's TOML configuration: an error is one line naming the file.
pub fn daemon_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("daemon.toml");
    if let Err(e) = watchkeeper_daemon::config::Config::from_toml(text, path) {
        one_line(&watchkeeper_daemon::error_chain(&e), "daemon.toml");
    }
}

fn one_line(message: &str, names: &str) {
    assert!(!message.contains('\n'), "{message:?}");
    assert!(message.contains(names), "{message:?} does not name {names}");
}
