//! `watchkeeper status`: the facts about every watchkeeper unit, their health, and how they are
//! shown (table, JSON schema version 1, `--watch`).

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;

use crate::cli::{FactArgs, StatusArgs};
use crate::layout::{self, Layout};
use crate::probe::{AskError, ask};
use crate::systemd::{Manager, Props};
use crate::{exit, hb};

/// The version of the JSON document; raised only for changes a reader of the old one cannot
/// handle (new fields do not raise it).
pub(crate) const SCHEMA_VERSION: u32 = 1;

/// The properties asked for every unit, in the one `systemctl show` call.
const PROPS: &[&str] = &[
    "Id",
    "LoadState",
    "ActiveState",
    "SubState",
    "UnitFileState",
    "MainPID",
    "ActiveEnterTimestampMonotonic",
    "WatchdogUSec",
    "NRestarts",
    "Result",
    "StatusText",
    "Listen",
];

/// How long a heartbeat may name another pid than MainPID after a (re)start: one poll cycle
/// of the worker (its default, 500 ms) and the time to write the first heartbeat.
const PID_GRACE: Duration = Duration::from_secs(2);

/// Health of one service, or of all of them (the worst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Health {
    Healthy,
    Degraded,
    Unhealthy,
}

impl Health {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unhealthy => "unhealthy",
        }
    }

    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Health::Healthy => exit::OK,
            Health::Degraded => exit::DEGRADED,
            Health::Unhealthy => exit::UNHEALTHY,
        }
    }

    /// 0 healthy, 1 degraded, 2 unhealthy (the metrics' value).
    pub(crate) fn level(self) -> u8 {
        self as u8
    }
}

/// What a unit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    Daemon,
    Socket,
    Worker,
    WorkerInstance,
}

/// The daemon's answer on its socket.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DaemonFacts {
    pub(crate) socket: Option<String>,
    /// `None` when not asked (the daemon is not running: asking would start it), or when the
    /// socket's permissions do not let this uid connect.
    pub(crate) answers: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) jobs: Option<watchkeeper_jobs::Stats>,
    /// The daemon refused this uid (by its socket's mode, or by its `allowed_uids`): the job
    /// counts are unchecked (the service's `unchecked` says so in the JSON).
    #[serde(skip)]
    pub(crate) denied: bool,
}

/// Heartbeat facts plus the comparison with the unit.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HeartbeatView {
    pub(crate) path: String,
    #[serde(flatten)]
    pub(crate) facts: hb::Facts,
    /// Whether the heartbeat's pid is the unit's MainPID.
    pub(crate) pid_matches: bool,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Service {
    pub(crate) unit: String,
    pub(crate) kind: Kind,
    pub(crate) instance: Option<String>,
    pub(crate) load_state: String,
    pub(crate) active_state: String,
    pub(crate) sub_state: String,
    pub(crate) enabled: String,
    pub(crate) main_pid: u32,
    pub(crate) uptime_sec: u64,
    pub(crate) watchdog_sec: u64,
    pub(crate) restarts: u64,
    pub(crate) result: String,
    pub(crate) status_text: String,
    pub(crate) health: Health,
    /// Why the health is not `healthy`, one short phrase each.
    pub(crate) reasons: Vec<String>,
    /// What this uid may not read (a heartbeat, the daemon's socket), one short phrase each:
    /// left out of the health, which is judged on the rest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) unchecked: Vec<String>,
    pub(crate) heartbeat: Option<HeartbeatView>,
    pub(crate) daemon: Option<DaemonFacts>,
}

/// The whole report (JSON schema version [`SCHEMA_VERSION`]).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) schema_version: u32,
    pub(crate) manager: &'static str,
    pub(crate) generated_unix: u64,
    pub(crate) max_age_secs: u64,
    pub(crate) overall_health: Health,
    /// Every fact could be read; `false` when some were not readable by this uid (see each
    /// service's `unchecked`), e.g. a system installation asked without root.
    pub(crate) complete: bool,
    /// The uid that asked.
    pub(crate) uid: u32,
    pub(crate) services: Vec<Service>,
}

impl Report {
    /// The exit code: what is known to be wrong wins (unhealthy, then degraded); healthy as
    /// far as could be seen, with facts unreadable, is "could not ask".
    pub(crate) fn exit_code(&self) -> u8 {
        if self.overall_health == Health::Healthy && !self.complete {
            exit::CANNOT_ASK
        } else {
            self.overall_health.exit_code()
        }
    }
}

/// Microseconds of CLOCK_MONOTONIC, the clock of systemd's `*TimestampMonotonic`.
fn monotonic_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1000
}

fn num(p: &Props, k: &str) -> u64 {
    p.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn text(p: &Props, k: &str) -> String {
    p.get(k).cloned().unwrap_or_default()
}

/// A time span as `systemctl show` prints it (`10s`, `1min 30s`, `0`; plain microseconds
/// with `--value` on older versions): whole seconds, 0 when off or unparsable.
fn timespan_secs(v: &str) -> u64 {
    if let Ok(us) = v.parse::<u64>() {
        return us / 1_000_000;
    }
    if v == "infinity" {
        return 0;
    }
    humantime::parse_duration(v).map_or(0, |d| d.as_secs())
}

/// `Listen=/run/user/1000/watchkeeper-daemon.sock (Stream)`: the path.
fn listen_path(p: &Props) -> Option<String> {
    let l = p.get("Listen")?;
    let path = l.rsplit_once(" (").map_or(l.as_str(), |(a, _)| a);
    (!path.is_empty()).then(|| path.to_owned())
}

/// The unit file states that count as enabled (`static`, `indirect`... are installed the way
/// their author meant).
fn counts_as_enabled(state: &str) -> bool {
    matches!(
        state,
        "enabled" | "enabled-runtime" | "static" | "indirect" | "generated" | "alias" | "linked"
    )
}

/// The units to report: the daemon, its socket, the worker, and every loaded instance of the
/// worker template. The plain worker is left out when instances are in use and it is neither
/// enabled, running nor failed.
pub(crate) fn collect(args: &FactArgs) -> Result<Report> {
    let m = Manager {
        user: args.manager.is_user(),
    };
    let layout = Layout::new(m.user);
    let instances = m.list_units(layout::WORKER_INSTANCES)?;
    let mut units = vec![
        layout::SOCKET.to_owned(),
        layout::DAEMON.to_owned(),
        layout::WORKER.to_owned(),
    ];
    units.extend(instances.iter().cloned());
    let props = m.show(&units, PROPS)?;
    let now_us = monotonic_us();
    let hb_dir = args
        .heartbeat_dir
        .clone()
        .unwrap_or_else(|| layout.worker_state_dir());

    let socket_path = props.first().and_then(listen_path);
    let mut services = Vec::new();
    for (unit, p) in units.iter().zip(&props) {
        let kind = if unit == layout::SOCKET {
            Kind::Socket
        } else if unit == layout::DAEMON {
            Kind::Daemon
        } else if unit == layout::WORKER {
            Kind::Worker
        } else {
            Kind::WorkerInstance
        };
        let active = text(p, "ActiveState");
        let enabled = text(p, "UnitFileState");
        if kind == Kind::Worker
            && !instances.is_empty()
            && active == "inactive"
            && !counts_as_enabled(&enabled)
        {
            continue;
        }
        let since = num(p, "ActiveEnterTimestampMonotonic");
        let uptime_sec = if active == "active" && since > 0 {
            now_us.saturating_sub(since) / 1_000_000
        } else {
            0
        };
        let mut s = Service {
            unit: unit.clone(),
            kind,
            instance: layout::instance_of(unit).map(str::to_owned),
            load_state: text(p, "LoadState"),
            active_state: active,
            sub_state: text(p, "SubState"),
            enabled,
            main_pid: num(p, "MainPID") as u32,
            uptime_sec,
            watchdog_sec: timespan_secs(&text(p, "WatchdogUSec")),
            restarts: num(p, "NRestarts"),
            result: text(p, "Result"),
            status_text: text(p, "StatusText"),
            health: Health::Healthy,
            reasons: Vec::new(),
            unchecked: Vec::new(),
            heartbeat: None,
            daemon: None,
        };
        if matches!(kind, Kind::Worker | Kind::WorkerInstance)
            && let Some(file) = layout::heartbeat_file(unit)
        {
            let path = hb_dir.join(file);
            let facts = hb::read(&path, args.max_age);
            s.heartbeat = Some(HeartbeatView {
                path: path.display().to_string(),
                pid_matches: facts.pid.is_some() && facts.pid == Some(s.main_pid),
                facts,
            });
        }
        if kind == Kind::Daemon {
            let mut d = DaemonFacts {
                socket: socket_path.clone(),
                answers: None,
                version: None,
                error: None,
                jobs: None,
                denied: false,
            };
            if s.active_state == "active"
                && let Some(sock) = &socket_path
            {
                match ask(&PathBuf::from(sock), Duration::from_secs(2)) {
                    Ok(a) => {
                        d.answers = Some(true);
                        d.version = Some(a.version);
                        d.jobs = Some(a.stats);
                    }
                    Err(AskError::Denied { message, answered }) => {
                        // It refused us by its socket's mode (nothing known) or by its
                        // allowed_uids (then it answered): not the daemon's fault.
                        d.answers = answered.then_some(true);
                        d.denied = true;
                        d.error = Some(message);
                    }
                    Err(AskError::Failed(e)) => {
                        d.answers = Some(false);
                        d.error = Some(e);
                    }
                }
            }
            s.daemon = Some(d);
        }
        classify(&mut s, args.max_age);
        services.push(s);
    }
    let overall_health = services
        .iter()
        .map(|s| s.health)
        .max()
        .unwrap_or(Health::Unhealthy);
    let complete = services.iter().all(|s| s.unchecked.is_empty());
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        manager: if m.user { "user" } else { "system" },
        generated_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        max_age_secs: args.max_age.as_secs(),
        overall_health,
        complete,
        uid: rustix::process::getuid().as_raw(),
        services,
    })
}

/// The health rules (README, "Operator CLI"): unhealthy = failed, not loaded or not found;
/// degraded = loaded but not active (and not failed), not enabled, or active with a stale or
/// missing heartbeat, a heartbeat pid that is not MainPID past [`PID_GRACE`], a self-reported
/// degraded or stalled health, or a daemon that does not answer on its socket.
fn classify(s: &mut Service, max_age: Duration) {
    let mut worst = Health::Healthy;
    let mut why = |h: Health, r: String, reasons: &mut Vec<String>| {
        worst = worst.max(h);
        reasons.push(r);
    };
    let mut reasons = Vec::new();
    let mut unchecked = Vec::new();
    if s.load_state != "loaded" {
        why(
            Health::Unhealthy,
            format!("not loaded ({})", s.load_state),
            &mut reasons,
        );
    } else if s.active_state == "failed" {
        why(
            Health::Unhealthy,
            format!("failed ({})", s.result),
            &mut reasons,
        );
    } else if s.active_state != "active" {
        why(
            Health::Degraded,
            format!("{} ({})", s.active_state, s.sub_state),
            &mut reasons,
        );
    } else {
        // A socket is `running` while its service holds it (Accept=no), else `listening`.
        let want = if s.kind == Kind::Socket {
            "listening"
        } else {
            "running"
        };
        if s.sub_state != want && !(s.kind == Kind::Socket && s.sub_state == "running") {
            why(
                Health::Degraded,
                format!("active ({}), not {want}", s.sub_state),
                &mut reasons,
            );
        }
        if let Some(h) = &s.heartbeat {
            let f = &h.facts;
            if f.permission_denied {
                unchecked.push(format!("heartbeat {}: permission denied", h.path));
            } else if let Some(e) = &f.error {
                why(
                    Health::Degraded,
                    format!("heartbeat unreadable: {e}"),
                    &mut reasons,
                );
            } else if !f.found {
                if s.uptime_sec as u128 > max_age.as_millis() / 1000 {
                    why(Health::Degraded, "no heartbeat".to_owned(), &mut reasons);
                }
            } else if !f.fresh {
                why(
                    Health::Degraded,
                    format!(
                        "stale heartbeat ({}s > {}s)",
                        f.age_secs.unwrap_or(0),
                        max_age.as_secs()
                    ),
                    &mut reasons,
                );
            }
            if f.found
                && f.error.is_none()
                && !h.pid_matches
                && Duration::from_secs(s.uptime_sec) > PID_GRACE
            {
                why(
                    Health::Degraded,
                    format!(
                        "heartbeat pid {} is not MainPID {}",
                        f.pid.unwrap_or(0),
                        s.main_pid
                    ),
                    &mut reasons,
                );
            }
            if f.self_degraded() {
                why(
                    Health::Degraded,
                    format!("says {}", f.health_status),
                    &mut reasons,
                );
            }
        }
        if let Some(d) = &s.daemon
            && d.denied
        {
            unchecked.push(format!("job counts: {}", d.error.as_deref().unwrap_or("?")));
        }
        if let Some(d) = &s.daemon
            && d.answers == Some(false)
        {
            why(
                Health::Degraded,
                format!(
                    "socket does not answer: {}",
                    d.error.as_deref().unwrap_or("?")
                ),
                &mut reasons,
            );
        }
    }
    if s.load_state == "loaded" && !counts_as_enabled(&s.enabled) {
        why(
            Health::Degraded,
            format!("not enabled ({})", s.enabled),
            &mut reasons,
        );
    }
    s.health = worst;
    s.reasons = reasons;
    s.unchecked = unchecked;
}

/// Whether to colour: a terminal, and no `NO_COLOR` (<https://no-color.org>).
fn use_colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn paint(h: Health, colour: bool) -> String {
    if !colour {
        return h.as_str().to_owned();
    }
    let c = match h {
        Health::Healthy => "32",
        Health::Degraded => "33",
        Health::Unhealthy => "31",
    };
    format!("\x1b[{c}m{}\x1b[0m", h.as_str())
}

fn human_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The human table: columns padded to their widest cell, by characters.
pub(crate) fn table(r: &Report, colour: bool) -> String {
    let head = [
        "UNIT",
        "HEALTH",
        "STATE",
        "ENABLED",
        "PID",
        "UPTIME",
        "RESTARTS",
        "HEARTBEAT",
        "STATUS",
    ];
    let mut rows: Vec<[String; 9]> = Vec::new();
    for s in &r.services {
        let hbcol = match &s.heartbeat {
            None => "-".to_owned(),
            Some(h) if h.facts.permission_denied => "no access".to_owned(),
            Some(h) if !h.facts.found => "none".to_owned(),
            Some(h) if h.facts.error.is_some() => "unreadable".to_owned(),
            Some(h) => format!(
                "{} {}{}",
                human_secs(h.facts.age_secs.unwrap_or(0)),
                if h.facts.fresh { "fresh" } else { "STALE" },
                if h.pid_matches { "" } else { " pid?" }
            ),
        };
        let mut status = s.status_text.clone();
        if !s.reasons.is_empty() {
            if !status.is_empty() {
                status.push_str(" | ");
            }
            status.push_str(&s.reasons.join("; "));
        }
        rows.push([
            s.unit.clone(),
            s.health.as_str().to_owned(),
            format!("{} ({})", s.active_state, s.sub_state),
            s.enabled.clone(),
            if s.main_pid == 0 {
                "-".to_owned()
            } else {
                s.main_pid.to_string()
            },
            if s.uptime_sec == 0 {
                "-".to_owned()
            } else {
                human_secs(s.uptime_sec)
            },
            s.restarts.to_string(),
            hbcol,
            status,
        ]);
    }
    let mut w = head.map(|h| h.chars().count());
    for row in &rows {
        for (i, c) in row.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String, health: Option<Health>| {
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i].saturating_sub(c.chars().count());
            let cell = match (i, health) {
                (1, Some(h)) => paint(h, colour),
                _ => c.clone(),
            };
            if i + 1 == cells.len() {
                out.push_str(&cell);
            } else {
                let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
            }
        }
        let trimmed = out.trim_end_matches(' ').len();
        out.truncate(trimmed);
        out.push('\n');
    };
    line(&head.map(str::to_owned), &mut out, None);
    for (row, s) in rows.iter().zip(&r.services) {
        line(row, &mut out, Some(s.health));
    }
    for s in &r.services {
        if let Some(d) = &s.daemon {
            let sock = d.socket.as_deref().unwrap_or("?");
            match (d.answers, &d.jobs) {
                (Some(true), Some(j)) => {
                    let _ = writeln!(
                        out,
                        "daemon: {sock} answers (version {}); jobs: {} queued, {} claimed, {} completed, {} failed, {} denied, {} quarantined",
                        d.version.as_deref().unwrap_or("?"),
                        j.queued,
                        j.claimed,
                        j.completed,
                        j.failed,
                        j.denied,
                        j.quarantined
                    );
                }
                (_, None) if d.denied => {
                    let _ = writeln!(
                        out,
                        "daemon: {sock} not asked: {}",
                        d.error.as_deref().unwrap_or("?")
                    );
                }
                (Some(false), _) => {
                    let _ = writeln!(
                        out,
                        "daemon: {sock} does not answer: {}",
                        d.error.as_deref().unwrap_or("?")
                    );
                }
                _ => {
                    let _ = writeln!(out, "daemon: not running, {sock} not asked");
                }
            }
        }
    }
    if !r.complete {
        let unchecked: Vec<String> = r
            .services
            .iter()
            .flat_map(|s| s.unchecked.iter().map(move |u| format!("{}: {u}", s.unit)))
            .collect();
        let _ = writeln!(
            out,
            "not checked as uid {} (run as root to see everything): {}",
            r.uid,
            unchecked.join("; ")
        );
    }
    let _ = writeln!(
        out,
        "overall: {}{}",
        paint(r.overall_health, colour),
        if r.complete { "" } else { " (incomplete)" }
    );
    out
}

/// `watchkeeper status`.
pub(crate) fn run(args: &StatusArgs) -> Result<u8> {
    if !args.watch {
        let r = collect(&args.facts)?;
        print_one(&r, args.json, use_colour())?;
        return Ok(r.exit_code());
    }
    let tty = std::io::stdout().is_terminal();
    let colour = use_colour();
    let mut n = 0u64;
    let mut code;
    loop {
        let frame = collect(&args.facts);
        let mut out = std::io::stdout().lock();
        if tty {
            // Home and clear, like watch(1).
            write!(out, "\x1b[H\x1b[2J")?;
        } else if n > 0 {
            writeln!(out)?;
        }
        if !args.json {
            writeln!(
                out,
                "watchkeeper status, every {:?} ({})",
                args.interval,
                humantime::format_rfc3339_seconds(SystemTime::now())
            )?;
        }
        drop(out);
        match frame {
            Ok(r) => {
                print_one(&r, args.json, colour)?;
                code = r.exit_code();
            }
            Err(e) => {
                println!("cannot ask: {e:#}");
                code = exit::code_of(&e);
            }
        }
        std::io::stdout().flush()?;
        n += 1;
        if args.frames.is_some_and(|f| n >= f) {
            return Ok(code);
        }
        std::thread::sleep(args.interval);
    }
}

fn print_one(r: &Report, json: bool, colour: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, r)?;
        writeln!(out)?;
    } else {
        out.write_all(table(r, colour).as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(unit: &str, active: &str, sub: &str) -> Service {
        Service {
            unit: unit.to_owned(),
            kind: Kind::WorkerInstance,
            instance: None,
            load_state: "loaded".to_owned(),
            active_state: active.to_owned(),
            sub_state: sub.to_owned(),
            enabled: "enabled".to_owned(),
            main_pid: 42,
            uptime_sec: 100,
            watchdog_sec: 10,
            restarts: 0,
            result: "success".to_owned(),
            status_text: String::new(),
            health: Health::Healthy,
            reasons: Vec::new(),
            unchecked: Vec::new(),
            heartbeat: None,
            daemon: None,
        }
    }

    fn with_hb(mut s: Service, fresh: bool, pid: u32, health: &str) -> Service {
        s.heartbeat = Some(HeartbeatView {
            path: "x".to_owned(),
            pid_matches: pid == s.main_pid,
            facts: hb::Facts {
                found: true,
                fresh,
                age_secs: Some(if fresh { 1 } else { 500 }),
                pid: Some(pid),
                health_status: health.to_owned(),
                ..hb::Facts::default()
            },
        });
        s
    }

    fn health(mut s: Service) -> Health {
        classify(&mut s, Duration::from_secs(120));
        s.health
    }

    #[test]
    fn timespans() {
        assert_eq!(timespan_secs("10s"), 10);
        assert_eq!(timespan_secs("1min 30s"), 90);
        assert_eq!(timespan_secs("0"), 0);
        assert_eq!(timespan_secs("infinity"), 0);
        assert_eq!(timespan_secs("4000000"), 4);
    }

    #[test]
    fn the_health_rules() {
        let run = || svc("w", "active", "running");
        assert_eq!(health(with_hb(run(), true, 42, "ok")), Health::Healthy);
        assert_eq!(health(with_hb(run(), false, 42, "ok")), Health::Degraded);
        assert_eq!(health(with_hb(run(), true, 7, "ok")), Health::Degraded);
        assert_eq!(
            health(with_hb(run(), true, 42, "degraded")),
            Health::Degraded
        );
        assert_eq!(health(svc("w", "inactive", "dead")), Health::Degraded);
        assert_eq!(health(svc("w", "activating", "start")), Health::Degraded);
        assert_eq!(health(svc("w", "failed", "failed")), Health::Unhealthy);
        let mut nf = svc("w", "inactive", "dead");
        nf.load_state = "not-found".to_owned();
        assert_eq!(health(nf), Health::Unhealthy);
        let mut dis = run();
        dis.enabled = "disabled".to_owned();
        assert_eq!(health(dis), Health::Degraded);
        // A fresh restart: the old pid in the heartbeat is fine within the grace.
        let mut young = with_hb(run(), true, 7, "ok");
        young.uptime_sec = 0;
        assert_eq!(health(young), Health::Healthy);
    }

    /// What this uid may not read is left out of the health, named in `unchecked`, and turns
    /// the exit code into "could not ask" unless something is unhealthy.
    #[test]
    fn unreadable_facts_are_unchecked_not_degraded() {
        let mut denied = with_hb(svc("w", "active", "running"), true, 42, "ok");
        if let Some(h) = &mut denied.heartbeat {
            h.facts = hb::Facts {
                permission_denied: true,
                error: Some("heartbeat file x: open failed".to_owned()),
                health_status: "unknown".to_owned(),
                ..hb::Facts::default()
            };
            h.pid_matches = false;
        }
        classify(&mut denied, Duration::from_secs(120));
        assert_eq!(denied.health, Health::Healthy, "{:?}", denied.reasons);
        assert_eq!(denied.unchecked, ["heartbeat x: permission denied"]);
        let report = |services: Vec<Service>| Report {
            schema_version: 1,
            manager: "system",
            generated_unix: 0,
            max_age_secs: 120,
            overall_health: services.iter().map(|s| s.health).max().unwrap(),
            complete: services.iter().all(|s| s.unchecked.is_empty()),
            uid: 1003,
            services,
        };
        let r = report(vec![denied.clone()]);
        assert_eq!(r.exit_code(), exit::CANNOT_ASK);
        let t = table(&r, false);
        assert!(t.contains(" no access"), "{t}");
        assert!(
            t.contains("not checked as uid 1003 (run as root to see everything): w: heartbeat x"),
            "{t}"
        );
        assert!(t.ends_with("overall: healthy (incomplete)\n"), "{t}");
        // Something known to be wrong still says so.
        let mut failed = svc("v", "failed", "failed");
        classify(&mut failed, Duration::from_secs(120));
        assert_eq!(
            report(vec![denied.clone(), failed]).exit_code(),
            exit::UNHEALTHY
        );
        let mut stale = with_hb(svc("v", "active", "running"), false, 42, "ok");
        classify(&mut stale, Duration::from_secs(120));
        assert_eq!(report(vec![denied, stale]).exit_code(), exit::DEGRADED);
        // Everything read: the health's own code.
        let mut ok = with_hb(svc("w", "active", "running"), true, 42, "ok");
        classify(&mut ok, Duration::from_secs(120));
        assert_eq!(report(vec![ok]).exit_code(), exit::OK);
    }

    #[test]
    fn table_columns_align_whatever_the_lengths() {
        let r = Report {
            schema_version: 1,
            manager: "user",
            generated_unix: 0,
            max_age_secs: 120,
            overall_health: Health::Degraded,
            complete: true,
            uid: 0,
            services: vec![
                svc("a.service", "active", "running"),
                svc(
                    "watchkeeper-worker@a-long-name.service",
                    "deactivating",
                    "stop-sigterm",
                ),
            ],
        };
        let t = table(&r, false);
        let lines: Vec<&str> = t.lines().take(3).collect();
        let col = |l: &str| l.find("healthy").or_else(|| l.find("HEALTH")).unwrap();
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));
        let en = |l: &str| l.find("enabled").or_else(|| l.find("ENABLED")).unwrap();
        assert_eq!(en(lines[0]), en(lines[1]));
        assert_eq!(en(lines[1]), en(lines[2]));
        assert!(!t.contains('\x1b'));
        assert!(table(&r, true).contains("\x1b[33mdegraded"));
    }
}
