//! End to end, under a real `systemd --user`: two instances of the shipped template,
//! `watchkeeper-worker@alpha` and `@beta`, each keep their own heartbeat file in the state
//! directory, written by their own main process, with their name and an advancing cycle count.

mod support;

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use support::wk::{SOCKET, Wk};
use watchkeeper::heartbeat::HealthStatus;

const DEADLINE: Duration = Duration::from_secs(20);
const NAMES: &[&str] = &["alpha", "beta"];

#[test]
fn two_template_instances_keep_their_own_heartbeats() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    wk.systemctl_ok(["start", SOCKET])?;
    let units: Vec<String> = NAMES
        .iter()
        .map(|n| format!("watchkeeper-worker@{n}.service"))
        .collect();
    wk.systemctl_ok(["start", &units[0], &units[1]])?;

    let mut pids = Vec::new();
    for (name, unit) in NAMES.iter().zip(&units) {
        let p = wk.assert_running(unit)?;
        ensure!(p["StatusText"].starts_with("idle;"), "{unit}: {p:?}");
        let q = wk.show(unit, &["Description", "InvocationID"]);
        ensure!(
            q["Description"] == format!("watchkeeper worker {name}"),
            "{q:?}"
        );
        let pid: u32 = p["MainPID"].parse()?;
        let file = format!("heartbeat-{name}.json");
        // The first heartbeat with this pid, then a later one with more cycles.
        let first = wk.poll(&format!("{file} from pid {pid}"), unit, DEADLINE, || {
            Ok(wk
                .heartbeat(&file)?
                .filter(|h| h.pid == pid && h.counter("cycle_count") > 0))
        })?;
        let later = wk.poll(&format!("{file} advancing"), unit, DEADLINE, || {
            Ok(wk
                .heartbeat(&file)?
                .filter(|h| h.counter("cycle_count") > first.counter("cycle_count")))
        })?;
        eprintln!(
            "{unit}: MainPID {pid}, {}: cycle_count {} -> {}, health {}, extra {:?}",
            wk.worker_state_dir().join(&file).display(),
            first.counter("cycle_count"),
            later.counter("cycle_count"),
            later.health_status,
            later.extra
        );
        ensure!(
            later.pid == pid,
            "{file}: pid {} != MainPID {pid}",
            later.pid
        );
        ensure!(later.service == "watchkeeper-worker", "{later:?}");
        ensure!(later.health_status == HealthStatus::Ok, "{later:?}");
        ensure!(
            later.extra.get("worker").and_then(|w| w.as_str()) == Some(*name),
            "{file}: extra.worker: {:?}",
            later.extra
        );
        ensure!(
            later.invocation_id.as_deref() == Some(q["InvocationID"].as_str()),
            "{file}: invocation_id {:?} != {unit}'s {:?}",
            later.invocation_id,
            q["InvocationID"]
        );
        ensure!(later.timestamp_unix >= first.timestamp_unix);
        pids.push(pid);
    }
    ensure!(
        pids[0] != pids[1],
        "one process for both instances: {pids:?}"
    );

    // Exactly the two instance heartbeats in the shared state directory (mode 0700, the user's).
    let dir = wk.worker_state_dir();
    // (A writer's temporary `.NAME.tmp` may come and go.)
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .filter(|n: &Result<String>| n.as_ref().map_or(true, |n| !n.starts_with('.')))
        .collect::<Result<_>>()?;
    files.sort();
    ensure!(
        files == ["heartbeat-alpha.json", "heartbeat-beta.json"],
        "{}: {files:?}",
        dir.display()
    );
    let meta = std::fs::metadata(&dir)?;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    ensure!(
        meta.permissions().mode() & 0o777 == 0o700 && meta.uid() == wk.uid(),
        "{}: mode {:o} uid {}",
        dir.display(),
        meta.permissions().mode(),
        meta.uid()
    );

    // Stopping one leaves the other working.
    wk.systemctl_ok(["stop", &units[0]])?;
    let beta = wk
        .heartbeat("heartbeat-beta.json")?
        .context("beta's heartbeat")?;
    wk.poll("beta keeps cycling", &units[1], DEADLINE, || {
        Ok(wk
            .heartbeat("heartbeat-beta.json")?
            .filter(|h| h.counter("cycle_count") > beta.counter("cycle_count")))
    })?;
    let alpha = wk
        .heartbeat("heartbeat-alpha.json")?
        .context("alpha's heartbeat")?;
    ensure!(
        alpha.health_status == HealthStatus::Stopping,
        "alpha's last heartbeat: {alpha:?}"
    );
    wk.assert_running(&units[1])?;
    Ok(())
}
