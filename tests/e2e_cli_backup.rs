//! End to end, under a real `systemd --user`: `watchkeeper backup` while jobs are submitted
//! takes snapshots in which every job is whole or absent (the ids a gap-free prefix, every row
//! complete), verified; `restore` refuses while the daemon runs, keeps the replaced store, and
//! the restored store serves its jobs to a worker.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use support::wk::{DAEMON, SOCKET, Wk, built_binary};

const DEADLINE: Duration = Duration::from_secs(60);
const JOBS: u64 = 200;

fn cli(wk: &Wk, bin: &Path, args: &[&str]) -> (i32, String, String) {
    let o = wk.run(bin, args);
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The ids of a snapshot, checking that each row is whole.
fn snapshot_ids(path: &Path) -> Result<Vec<u64>> {
    let c =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    ensure!(ok == "ok", "{}: {ok}", path.display());
    let mut st = c.prepare("SELECT id, spec, state, created_ms FROM jobs ORDER BY id")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as u64,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut ids = Vec::new();
    for row in rows {
        let (id, spec, state, created) = row?;
        let v: serde_json::Value =
            serde_json::from_str(&spec).with_context(|| format!("job {id}: {spec}"))?;
        ensure!(
            v["command"][0] == "echo" && v["command"][1].as_str() == Some(id.to_string().as_str()),
            "job {id}: {spec}"
        );
        ensure!(
            state == "queued" && created > 0,
            "job {id}: {state} {created}"
        );
        ids.push(id);
    }
    Ok(ids)
}

#[test]
fn backups_during_submissions_and_a_restore_that_serves() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    let bin = wk.install_binary(&built_binary("watchkeeper")?);
    wk.systemctl_ok(["start", SOCKET, DAEMON])?;
    wk.wait_for(DAEMON, "SubState", "running", DEADLINE)?;
    let snaps = wk.state_dir().join("snaps");
    fs::create_dir(&snaps)?;
    fs::set_permissions(&snaps, fs::Permissions::from_mode(0o755))?;
    std::os::unix::fs::chown(&snaps, Some(wk.uid()), Some(wk.gid()))?;

    // One process submits JOBS jobs (`echo N`, N = its id) while backups are taken.
    let wk_jobs = wk.user_home().join(".local/bin/wk-jobs");
    let script = format!(
        "for i in $(seq 1 {JOBS}); do {} --socket {} submit -- echo $i >/dev/null || exit 1; done",
        wk_jobs.display(),
        wk.socket_path()
    );
    let mut taken: Vec<PathBuf> = Vec::new();
    std::thread::scope(|s| -> Result<()> {
        let submitter = s.spawn(|| wk.run("sh", ["-c", &script]));
        let mut n = 0;
        while !submitter.is_finished() || n < 3 {
            let to = snaps.join(format!("snap-{n}.sqlite3"));
            let (code, out, err) = cli(&wk, &bin, &["backup", "--to", &to.display().to_string()]);
            ensure!(
                code == 0 && out.starts_with("backup: ") && out.contains("integrity ok"),
                "{out}{err}"
            );
            taken.push(to);
            n += 1;
        }
        let o = submitter.join().expect("submitter");
        ensure!(
            o.status.success(),
            "submitting: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(())
    })?;
    let mut counts = Vec::new();
    for snap in &taken {
        let ids = snapshot_ids(snap)?;
        let want: Vec<u64> = (1..=ids.len() as u64).collect();
        ensure!(ids == want, "{}: ids with a gap: {ids:?}", snap.display());
        counts.push(ids.len() as u64);
    }
    eprintln!("snapshot job counts: {counts:?}");
    ensure!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    ensure!(
        counts.iter().any(|&c| c > 0 && c < JOBS),
        "no backup overlapped the submissions: {counts:?}"
    );
    let (code, out, _) = cli(
        &wk,
        &bin,
        &["backup", "--to", &taken[0].display().to_string()],
    );
    ensure!(code == 6, "overwrote an existing backup: {out}");

    // Restore: refused while the daemon runs, and nothing changes.
    let pick = taken
        .iter()
        .zip(&counts)
        .find(|(_, c)| **c > 0 && **c < JOBS)
        .map(|(p, c)| (p.clone(), *c))
        .context("snapshot")?;
    let (code, _, err) = cli(&wk, &bin, &["restore", &pick.0.display().to_string()]);
    ensure!(
        code == 6 && err.contains("stop watchkeeper-daemon.socket watchkeeper-daemon.service"),
        "{code} {err}"
    );
    ensure!(wk.stats()?["queued"] == JOBS);

    // A file that is not a store is refused before anything changes.
    let bad = snaps.join("bad.sqlite3");
    fs::write(
        &bad,
        b"not a database at all, just some bytes to fill a page.......",
    )?;
    wk.systemctl_ok(["stop", SOCKET, DAEMON])?;
    let (code, _, err) = cli(&wk, &bin, &["restore", &bad.display().to_string()]);
    ensure!(code == 5 && err.contains("bad.sqlite3"), "{code} {err}");

    // Restore the snapshot and start again: the replaced store is kept, the restored one serves.
    let (code, out, err) = cli(
        &wk,
        &bin,
        &["restore", "--start", &pick.0.display().to_string()],
    );
    ensure!(code == 0, "{out}{err}");
    let state = wk.user_home().join(".config/watchkeeper-daemon");
    let replaced: Vec<PathBuf> = fs::read_dir(&state)?
        .map(|e| Ok(e?.path()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("jobs.sqlite3.replaced-")
                    && !n.ends_with("-wal")
                    && !n.ends_with("-shm")
            })
        })
        .collect();
    ensure!(replaced.len() == 1, "{replaced:?}");
    ensure!(
        snapshot_ids(&replaced[0])?.len() as u64 == JOBS,
        "the replaced store is not whole"
    );
    let stats = wk.stats()?;
    ensure!(
        stats["queued"] == pick.1,
        "restored {} jobs, stats {stats:?}",
        pick.1
    );
    wk.systemctl_ok(["start", "watchkeeper-worker@alpha.service"])?;
    wk.poll(
        "the restored jobs done",
        "watchkeeper-worker@alpha.service",
        DEADLINE,
        || Ok((wk.stats()?["completed"] == pick.1).then_some(())),
    )?;
    Ok(())
}
