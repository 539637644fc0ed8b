//! End to end, under a real `systemd --user`: `watchkeeper status` and `watchkeeper probe`
//! against the shipped units, two discovered `worker@` instances and the daemon, through the
//! faults of the runbook (a stopped worker, a stale heartbeat, a pid mismatch, a failed unit,
//! no manager at all).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use support::wk::{DAEMON, SOCKET, Wk, built_binary};

const DEADLINE: Duration = Duration::from_secs(30);
const ALPHA: &str = "watchkeeper-worker@alpha.service";
const BETA: &str = "watchkeeper-worker@beta.service";

/// `watchkeeper ARGS` as the user: (exit code, stdout, stderr).
fn cli(wk: &Wk, bin: &Path, args: &[&str]) -> (i32, String, String) {
    let out = wk.run(bin, args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(wk: &Wk, bin: &Path, extra: &[&str]) -> Result<(i32, Value)> {
    let mut args = vec!["status", "--json"];
    args.extend(extra);
    let (code, out, err) = cli(wk, bin, &args);
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("status --json (exit {code}): {out}{err}"))?;
    Ok((code, v))
}

fn service<'a>(v: &'a Value, unit: &str) -> Result<&'a Value> {
    v["services"]
        .as_array()
        .context("services")?
        .iter()
        .find(|s| s["unit"] == unit)
        .with_context(|| format!("{unit} not in {v}"))
}

/// Polls `status --json` until `pred` holds; returns the last report.
fn wait_status(
    wk: &Wk,
    bin: &Path,
    extra: &[&str],
    what: &str,
    mut pred: impl FnMut(i32, &Value) -> bool,
) -> Result<(i32, Value)> {
    let mut last = None;
    wk.poll(what, ALPHA, DEADLINE, || {
        let (code, v) = status_json(wk, bin, extra)?;
        let done = pred(code, &v);
        last = Some((code, v.clone()));
        Ok(done.then_some((code, v)))
    })
    .with_context(|| format!("last status: {last:?}"))
}

/// The families as parsed by `tests/cli/check_metrics.py` (prometheus_client's parser).
fn parse_metrics(text: &str) -> Result<Value> {
    use std::io::Write as _;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cli/check_metrics.py");
    let mut child = std::process::Command::new("/usr/bin/python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("/usr/bin/python3 (Debian python3-prometheus-client) is needed")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the Prometheus parser rejects the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn setup() -> Result<Option<(Wk, PathBuf)>> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(None);
    };
    let bin = wk.install_binary(&built_binary("watchkeeper")?);
    wk.systemctl_ok(["enable", "--now", SOCKET, DAEMON, ALPHA, BETA])?;
    Ok(Some((wk, bin)))
}

#[test]
fn status_reports_health_through_the_faults() -> Result<()> {
    let Some((wk, bin)) = setup()? else {
        return Ok(());
    };
    // Healthy: both instances found (not listed by hand), heartbeats written by MainPID.
    let (code, v) = wait_status(&wk, &bin, &[], "healthy", |c, v| {
        c == 0 && v["overall_health"] == "healthy"
    })?;
    eprintln!("healthy: {v:#}");
    ensure!(code == 0 && v["schema_version"] == 1, "{v}");
    for unit in [ALPHA, BETA] {
        let s = service(&v, unit)?;
        ensure!(
            s["kind"] == "worker-instance" && s["health"] == "healthy",
            "{s}"
        );
        ensure!(
            s["watchdog_sec"] == 10 && s["main_pid"].as_u64() > Some(0),
            "{s}"
        );
        let hb = &s["heartbeat"];
        ensure!(hb["found"] == true && hb["fresh"] == true, "{s}");
        ensure!(
            hb["pid"] == s["main_pid"] && hb["pid_matches"] == true,
            "{s}"
        );
        ensure!(hb["health_status"] == "ok", "{s}");
        for k in [
            "cycle_count",
            "jobs_completed",
            "jobs_denied",
            "jobs_quarantined",
            "age_secs",
        ] {
            ensure!(hb[k].is_u64(), "{unit}: heartbeat.{k}: {s}");
        }
    }
    let d = service(&v, DAEMON)?;
    ensure!(d["daemon"]["answers"] == true, "{d}");
    ensure!(d["daemon"]["jobs"]["queued"].is_u64(), "{d}");
    let sock = service(&v, SOCKET)?;
    ensure!(sock["health"] == "healthy", "{sock}");
    // The plain worker is not in use: left out.
    ensure!(service(&v, "watchkeeper-worker.service").is_err(), "{v}");

    // The table: no colour when not a terminal, columns aligned.
    let (code, table, _) = cli(&wk, &bin, &["status"]);
    eprintln!("{table}");
    ensure!(code == 0 && !table.contains('\x1b'), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    let col = lines[0].find("HEALTH").context("header")?;
    for l in &lines[1..4] {
        ensure!(l[col..].starts_with("healthy"), "misaligned: {table}");
    }
    ensure!(table.contains("overall: healthy"), "{table}");

    // --watch, not on a terminal: frames are appended.
    let (code, frames, err) = cli(
        &wk,
        &bin,
        &["status", "--watch", "--frames", "2", "--interval", "200ms"],
    );
    ensure!(code == 0, "{frames}{err}");
    ensure!(
        frames.matches("watchkeeper status, every").count() == 2
            && frames.matches("overall: healthy").count() == 2
            && !frames.contains('\x1b'),
        "{frames}"
    );

    // Metrics, checked by prometheus_client's parser; and the same atomically in a textfile.
    let (code, text, err) = cli(&wk, &bin, &["metrics"]);
    ensure!(code == 0, "metrics: {err}");
    let fams = parse_metrics(&text)?;
    eprintln!("metrics: {fams}");
    ensure!(
        fams["watchkeeper_overall_health"]["samples"][0][2] == 0.0,
        "{fams}"
    );
    let up = fams["watchkeeper_unit_active"]["samples"].to_string();
    ensure!(
        up.contains(ALPHA) && up.contains("\"instance\":\"beta\""),
        "{up}"
    );
    ensure!(
        fams["watchkeeper_worker_cycles"]["type"] == "counter",
        "{fams}"
    );
    ensure!(
        fams["watchkeeper_unit_restarts"]["type"] == "counter",
        "{fams}"
    );
    ensure!(
        fams["watchkeeper_daemon_jobs"]["samples"]
            .as_array()
            .map(Vec::len)
            == Some(6),
        "{fams}"
    );
    let dir = wk.state_dir().join("textfile");
    std::fs::create_dir_all(&dir)?;
    std::os::unix::fs::chown(&dir, Some(wk.uid()), Some(wk.gid()))?;
    let (code, _, err) = cli(
        &wk,
        &bin,
        &["metrics", "--textfile", &dir.display().to_string()],
    );
    ensure!(code == 0, "metrics --textfile: {err}");
    let names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    ensure!(
        names == ["watchkeeper.prom"],
        "left in the textfile dir: {names:?}"
    );
    parse_metrics(&std::fs::read_to_string(dir.join("watchkeeper.prom"))?)?;
    let (code, _, err) = cli(&wk, &bin, &["metrics", "--textfile", "/nonexistent/dir"]);
    ensure!(
        code == 5 && err.contains("/nonexistent/dir"),
        "{code} {err}"
    );

    // The shipped metrics service and timer, as the units run them.
    let local_bin = wk.user_home().join(".local/bin/watchkeeper");
    wk.claim(&local_bin, false)?;
    std::fs::copy(&bin, &local_bin)?;
    std::os::unix::fs::chown(&local_bin, Some(wk.uid()), Some(wk.gid()))?;
    for unit in ["watchkeeper-metrics.service", "watchkeeper-metrics.timer"] {
        let text = support::wk::read_contrib(&format!("systemd/user/{unit}"))?;
        wk.write_user_file(&wk.unit_dir().join(unit), &text)?;
    }
    wk.systemctl_ok(["daemon-reload"])?;
    wk.systemctl_ok(["start", "watchkeeper-metrics.timer"])?;
    let prom = wk
        .user_home()
        .join(".config/watchkeeper-metrics/watchkeeper.prom");
    let text = wk.poll(
        "the timer's first metrics",
        "watchkeeper-metrics.service",
        DEADLINE,
        || Ok(std::fs::read_to_string(&prom).ok()),
    )?;
    parse_metrics(&text)?;
    let m = wk.show("watchkeeper-metrics.service", &["Result"]);
    ensure!(m["Result"] == "success", "{m:?}");

    // Probes.
    let alpha = service(&v, ALPHA)?;
    let hb_path = alpha["heartbeat"]["path"]
        .as_str()
        .context("path")?
        .to_owned();
    let pid = alpha["main_pid"].to_string();
    let (code, line, _) = cli(
        &wk,
        &bin,
        &["probe", "--heartbeat", &hb_path, "--expect-pid", &pid],
    );
    ensure!(
        code == 0 && line.starts_with("ok:") && line.lines().count() == 1,
        "{line}"
    );
    let (code, line, _) = cli(
        &wk,
        &bin,
        &["probe", "--heartbeat", &hb_path, "--expect-pid", "1"],
    );
    ensure!(code == 2 && line.contains("expected 1"), "{code} {line}");
    let (code, line, _) = cli(&wk, &bin, &["probe", "--heartbeat", "/nonexistent/hb.json"]);
    ensure!(
        code == 2 && line.contains("no heartbeat file"),
        "{code} {line}"
    );
    let sock_path = d["daemon"]["socket"].as_str().context("socket")?.to_owned();
    let (code, line, _) = cli(&wk, &bin, &["probe", "--socket", &sock_path]);
    ensure!(code == 0 && line.starts_with("ok:"), "{code} {line}");
    let (code, line, _) = cli(&wk, &bin, &["probe", "--socket", "/nonexistent.sock"]);
    ensure!(code == 2 && line.starts_with("unhealthy:"), "{code} {line}");
    let (code, _, _) = cli(&wk, &bin, &["probe"]);
    ensure!(code == 64, "usage error: {code}");

    // A pid mismatch: a heartbeat directory whose alpha heartbeat names another pid.
    let fake = wk.state_dir().join("fake-heartbeats");
    std::fs::create_dir_all(&fake)?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let real = std::fs::read_to_string(wk.worker_state_dir().join("heartbeat-alpha.json"))?;
    let mut doc: Value = serde_json::from_str(&real)?;
    doc["pid"] = Value::from(1u32);
    std::fs::write(fake.join("heartbeat-alpha.json"), doc.to_string() + "\n")?;
    std::fs::copy(
        wk.worker_state_dir().join("heartbeat-beta.json"),
        fake.join("heartbeat-beta.json"),
    )?;
    for f in ["heartbeat-alpha.json", "heartbeat-beta.json"] {
        std::fs::set_permissions(
            fake.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )?;
    }
    let fake_s = fake.display().to_string();
    // (Once the unit has run longer than the grace for a first heartbeat after a start.)
    let (code, v) = wait_status(
        &wk,
        &bin,
        &["--heartbeat-dir", &fake_s],
        "pid mismatch",
        |_, v| service(v, ALPHA).is_ok_and(|a| a["health"] == "degraded"),
    )?;
    let a = service(&v, ALPHA)?;
    ensure!(code == 1 && a["health"] == "degraded", "{v}");
    ensure!(a["heartbeat"]["pid_matches"] == false, "{a}");
    ensure!(a["reasons"].to_string().contains("is not MainPID"), "{a}");

    // A stopped worker: degraded (loaded, inactive, not failed).
    wk.systemctl_ok(["stop", BETA])?;
    let (code, v) = status_json(&wk, &bin, &[])?;
    let b = service(&v, BETA)?;
    ensure!(code == 1 && v["overall_health"] == "degraded", "{v}");
    ensure!(
        b["health"] == "degraded" && b["active_state"] == "inactive",
        "{b}"
    );

    // The stale-heartbeat drill: active, the watchdog pinged, but no more heartbeats.
    wk.drop_in(
        "watchkeeper-worker@beta.service",
        "[Service]\nEnvironment=WATCHKEEPER_DRILL_STALE_HEARTBEAT_AFTER=2\n",
    )?;
    wk.systemctl_ok(["start", BETA])?;
    let (_, v) = wait_status(
        &wk,
        &bin,
        &["--max-age", "2s"],
        "stale while active",
        |_, v| {
            service(v, BETA).is_ok_and(|b| {
                b["active_state"] == "active"
                    && b["health"] == "degraded"
                    && b["reasons"].to_string().contains("stale heartbeat")
            })
        },
    )?;
    eprintln!("stale: {}", service(&v, BETA)?);

    // The hung-loop drill: the watchdog restarts beta, and status counts the restart.
    wk.drop_in(
        "watchkeeper-worker@beta.service",
        "[Service]\nWatchdogSec=2\nEnvironment=WATCHKEEPER_DRILL_HANG_AFTER=4\n",
    )?;
    wk.systemctl_ok(["restart", BETA])?;
    let (_, v) = wait_status(&wk, &bin, &[], "the watchdog restart counted", |_, v| {
        service(v, BETA).is_ok_and(|b| b["restarts"].as_u64() >= Some(1))
    })?;
    eprintln!("after the hung loop: {}", service(&v, BETA)?);

    // A failed unit: unhealthy.
    wk.drop_in(
        "watchkeeper-worker@beta.service",
        "[Service]\nExecStart=\nExecStart=/bin/false\nRestart=no\n",
    )?;
    let _ = wk.systemctl(["restart", BETA]);
    wk.wait_for(BETA, "ActiveState", "failed", DEADLINE)?;
    let (code, v) = status_json(&wk, &bin, &[])?;
    ensure!(code == 2 && v["overall_health"] == "unhealthy", "{v}");
    ensure!(service(&v, BETA)?["health"] == "unhealthy", "{v}");

    // No manager to ask.
    let out = wk.run(
        "env",
        [
            "XDG_RUNTIME_DIR=/nonexistent",
            "DBUS_SESSION_BUS_ADDRESS=unix:path=/nonexistent/bus",
            &bin.display().to_string(),
            "status",
        ],
    );
    ensure!(
        out.status.code() == Some(3),
        "no manager: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
