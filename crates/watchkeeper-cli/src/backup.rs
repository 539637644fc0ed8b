//! `watchkeeper backup` and `restore` of the daemon's SQLite job store.
//!
//! The backup is SQLite's online backup API over a read-only connection, copying every page in
//! one step: one read transaction, so the snapshot is the store as of one commit (a job
//! submitted meanwhile is in it whole or not at all), never a file copy of a live database.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags};
use watchkeeper_daemon::store::{FILE_NAME, SCHEMA_VERSION};

use crate::cli::{BackupArgs, RestoreArgs};
use crate::exit;
use crate::layout::{self, Layout};
use crate::systemd::Manager;

/// What a verified store holds.
#[derive(Debug)]
struct Verified {
    schema_version: i64,
    jobs: i64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn open_ro(path: &Path) -> Result<Connection> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {} read-only", path.display()))?;
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(c)
}

/// `integrity_check` is `ok`, the schema version is one this daemon reads, the jobs table is
/// there.
fn verify(c: &Connection, path: &Path) -> Result<Verified> {
    let p = path.display();
    let integrity: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .with_context(|| format!("{p}: not a readable SQLite database"))?;
    if integrity != "ok" {
        anyhow::bail!("{p}: integrity_check says {integrity:?}");
    }
    let schema_version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if !(1..=SCHEMA_VERSION).contains(&schema_version) {
        anyhow::bail!(
            "{p}: schema version {schema_version}, this daemon reads 1 to {SCHEMA_VERSION}"
        );
    }
    let jobs: i64 = c
        .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
        .with_context(|| format!("{p}: no jobs table: not a watchkeeper job store"))?;
    Ok(Verified {
        schema_version,
        jobs,
    })
}

fn state_dir(arg: &Option<PathBuf>, user: bool) -> PathBuf {
    arg.clone()
        .unwrap_or_else(|| Layout::new(user).state_dir("watchkeeper-daemon"))
}

/// `backup`.
pub(crate) fn backup(args: &BackupArgs) -> Result<u8> {
    let dir = state_dir(&args.state_dir, args.manager.is_user());
    let db = dir.join(FILE_NAME);
    if !db.is_file() {
        return Err(exit::coded(
            exit::FAILED,
            format!("no job store at {} (--state-dir?)", db.display()),
        ));
    }
    let dest = match &args.to {
        Some(p) => p.clone(),
        None => dir
            .join("backups")
            .join(format!("jobs-{}.sqlite3", unix_now())),
    };
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    if dest.exists() {
        return Err(exit::coded(
            exit::REFUSED,
            format!("{} exists: choose another --to", dest.display()),
        ));
    }
    let src = open_ro(&db)?;
    // Written beside the destination and renamed when verified: no half backup under its name.
    let tmp = tempfile::Builder::new()
        .prefix(".wk-backup.")
        .tempfile_in(&parent)
        .with_context(|| format!("creating a file in {}", parent.display()))?;
    {
        let mut dst = Connection::open(tmp.path())?;
        let b = rusqlite::backup::Backup::new(&src, &mut dst)?;
        // -1: every page in one step, i.e. in one read transaction of the source
        // (`run_to_completion` only takes positive steps). Busy or locked: try again.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            use rusqlite::backup::StepResult;
            match b
                .step(-1)
                .with_context(|| format!("backing up {}", db.display()))?
            {
                StepResult::Done => break,
                StepResult::More | StepResult::Busy | StepResult::Locked
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => anyhow::bail!("backing up {}: gave up ({other:?})", db.display()),
            }
        }
    }
    let dst = Connection::open(tmp.path())?;
    let v = verify(&dst, tmp.path())?;
    drop(dst);
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.persist_noclobber(&dest)
        .with_context(|| format!("writing {}", dest.display()))?;
    println!(
        "backup: {} ({} jobs, schema version {}, integrity ok)",
        dest.display(),
        v.jobs,
        v.schema_version
    );
    Ok(exit::OK)
}

/// `restore`.
pub(crate) fn restore(args: &RestoreArgs) -> Result<u8> {
    let m = Manager {
        user: args.manager.is_user(),
    };
    m.reachable()?;
    let dir = state_dir(&args.state_dir, m.user);
    let v = verify(&open_ro(&args.file)?, &args.file)?;

    let props = m.show(
        &[layout::DAEMON.to_owned(), layout::SOCKET.to_owned()],
        &["ActiveState"],
    )?;
    let busy = |s: &str| !matches!(s, "inactive" | "failed" | "");
    let daemon = props[0].get("ActiveState").map_or("", String::as_str);
    let socket = props[1].get("ActiveState").map_or("", String::as_str);
    if busy(daemon) || busy(socket) {
        return Err(exit::coded(
            exit::REFUSED,
            format!(
                "refusing to restore while the daemon runs ({} {daemon}, {} {socket}: a \
                 connection would start it): {} first",
                layout::DAEMON,
                layout::SOCKET,
                m.cmd_line(&format!("stop {} {}", layout::SOCKET, layout::DAEMON))
            ),
        ));
    }

    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let db = dir.join(FILE_NAME);
    let owner = std::fs::metadata(&dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".wk-restore.")
        .tempfile_in(&dir)?;
    std::fs::copy(&args.file, tmp.path())
        .with_context(|| format!("copying {}", args.file.display()))?;
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(tmp.path(), Some(owner.uid()), Some(owner.gid()))?;
    }
    // The replaced store, with its WAL, stays beside the new one.
    let suffix = format!("replaced-{}", unix_now());
    if db.exists() {
        for ext in ["", "-wal", "-shm"] {
            let from = dir.join(format!("{FILE_NAME}{ext}"));
            if from.exists() {
                let to = dir.join(format!("{FILE_NAME}.{suffix}{ext}"));
                std::fs::rename(&from, &to)
                    .with_context(|| format!("moving {} aside", from.display()))?;
                println!("kept the replaced {} as {}", from.display(), to.display());
            }
        }
    }
    tmp.persist(&db)
        .with_context(|| format!("writing {}", db.display()))?;
    println!(
        "restored {} from {} ({} jobs, schema version {})",
        db.display(),
        args.file.display(),
        v.jobs,
        v.schema_version
    );
    if args.start {
        m.run_ok(&["start", layout::SOCKET, layout::DAEMON])?;
        println!(
            "{}",
            m.cmd_line(&format!("start {} {}", layout::SOCKET, layout::DAEMON))
        );
    }
    Ok(exit::OK)
}
