//! `watchkeeper metrics`: the facts of `status` in the Prometheus text exposition format
//! (version 0.0.4), on stdout or atomically into node_exporter's textfile directory.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{Context as _, Result};

use crate::cli::MetricsArgs;
use crate::exit;
use crate::status::{self, Kind, Report};

/// The file written by `--textfile DIR` (the collector reads `*.prom`).
pub(crate) const TEXTFILE: &str = "watchkeeper.prom";

/// One metric family: `# HELP`, `# TYPE` and its samples.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, String)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: String, value: impl ToString) {
        self.samples.push((labels, value.to_string()));
    }
}

/// A label value, escaped as the format requires (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The text for a report.
pub(crate) fn render(r: &Report) -> String {
    let mut up = Family::new(
        "watchkeeper_unit_active",
        "gauge",
        "1 when the unit is active, else 0.",
    );
    let mut health = Family::new(
        "watchkeeper_unit_health",
        "gauge",
        "Health of the unit: 0 healthy, 1 degraded, 2 unhealthy.",
    );
    let mut restarts = Family::new(
        "watchkeeper_unit_restarts_total",
        "counter",
        "Automatic restarts of the unit by the service manager (NRestarts).",
    );
    let mut uptime = Family::new(
        "watchkeeper_unit_uptime_seconds",
        "gauge",
        "Time since the unit became active, 0 when it is not.",
    );
    let mut watchdog = Family::new(
        "watchkeeper_unit_watchdog_seconds",
        "gauge",
        "The unit's watchdog timeout (WatchdogSec=), 0 when off.",
    );
    let mut hb_age = Family::new(
        "watchkeeper_heartbeat_age_seconds",
        "gauge",
        "Age of the worker's heartbeat.",
    );
    let mut hb_fresh = Family::new(
        "watchkeeper_heartbeat_fresh",
        "gauge",
        "1 when the worker's heartbeat is no older than the maximum age.",
    );
    let mut hb_pid = Family::new(
        "watchkeeper_heartbeat_pid_matches",
        "gauge",
        "1 when the heartbeat was written by the unit's main process.",
    );
    let mut cycles = Family::new(
        "watchkeeper_worker_cycles_total",
        "counter",
        "Work-loop cycles of the worker's current process.",
    );
    let mut completed = Family::new(
        "watchkeeper_worker_jobs_completed_total",
        "counter",
        "Jobs completed by the worker's current process.",
    );
    let mut denied = Family::new(
        "watchkeeper_worker_jobs_denied_total",
        "counter",
        "Jobs refused by the worker's current process (allowlist).",
    );
    let mut quarantined = Family::new(
        "watchkeeper_worker_jobs_quarantined_total",
        "counter",
        "Jobs quarantined by the worker's current process.",
    );
    let mut daemon_up = Family::new(
        "watchkeeper_daemon_answers",
        "gauge",
        "1 when the daemon answers on its socket.",
    );
    let mut jobs = Family::new(
        "watchkeeper_daemon_jobs",
        "gauge",
        "Jobs in the daemon's store, by state.",
    );
    let mut overall = Family::new(
        "watchkeeper_overall_health",
        "gauge",
        "The worst health of all units: 0 healthy, 1 degraded, 2 unhealthy.",
    );
    let mut complete = Family::new(
        "watchkeeper_status_complete",
        "gauge",
        "1 when every fact could be read by the uid that collected them (heartbeats, socket).",
    );
    for s in &r.services {
        let labels = format!(
            "unit=\"{}\",instance=\"{}\"",
            esc(&s.unit),
            esc(s.instance.as_deref().unwrap_or(""))
        );
        up.add(labels.clone(), u8::from(s.active_state == "active"));
        health.add(labels.clone(), s.health.level());
        uptime.add(labels.clone(), s.uptime_sec);
        if s.kind != Kind::Socket {
            restarts.add(labels.clone(), s.restarts);
            watchdog.add(labels.clone(), s.watchdog_sec);
        }
        if let Some(h) = &s.heartbeat
            && h.facts.found
            && h.facts.error.is_none()
        {
            let f = &h.facts;
            hb_age.add(labels.clone(), f.age_secs.unwrap_or(0));
            hb_fresh.add(labels.clone(), u8::from(f.fresh));
            hb_pid.add(labels.clone(), u8::from(h.pid_matches));
            cycles.add(labels.clone(), f.cycle_count);
            completed.add(labels.clone(), f.jobs_completed);
            denied.add(labels.clone(), f.jobs_denied);
            quarantined.add(labels.clone(), f.jobs_quarantined);
        }
        if let Some(d) = &s.daemon {
            // Not known when the socket refused the collecting uid: no sample.
            if d.answers.is_some() || !d.denied {
                daemon_up.add(String::new(), u8::from(d.answers == Some(true)));
            }
            if let Some(j) = &d.jobs {
                for (state, n) in [
                    ("queued", j.queued),
                    ("claimed", j.claimed),
                    ("completed", j.completed),
                    ("failed", j.failed),
                    ("denied", j.denied),
                    ("quarantined", j.quarantined),
                ] {
                    jobs.add(format!("state=\"{state}\""), n);
                }
            }
        }
    }
    overall.add(String::new(), r.overall_health.level());
    complete.add(String::new(), u8::from(r.complete));
    let mut out = String::new();
    for f in [
        up,
        health,
        restarts,
        uptime,
        watchdog,
        hb_age,
        hb_fresh,
        hb_pid,
        cycles,
        completed,
        denied,
        quarantined,
        daemon_up,
        jobs,
        overall,
        complete,
    ] {
        if f.samples.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{} {value}", f.name);
            } else {
                let _ = writeln!(out, "{}{{{labels}}} {value}", f.name);
            }
        }
    }
    out
}

/// `watchkeeper metrics`.
pub(crate) fn run(args: &MetricsArgs) -> Result<u8> {
    let r = status::collect(&args.facts)?;
    let text = render(&r);
    let Some(dir) = &args.textfile else {
        std::io::stdout().write_all(text.as_bytes())?;
        return Ok(exit::OK);
    };
    // The collector must never read half a file: write a temporary file in the same
    // directory (its name does not end in .prom), fsync, rename over the old one.
    let mut tmp = tempfile::Builder::new()
        .prefix(".watchkeeper.prom.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    let dest = dir.join(TEXTFILE);
    tmp.persist(&dest)
        .with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(exit::OK)
}
