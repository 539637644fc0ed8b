//! A heartbeat that cannot be written makes the worker `degraded` (`STATUS=`, one `warn` per
//! episode, an `info` when it recovers) instead of a warning every cycle.
//!
//! As root, the heartbeat lives on a real, small tmpfs: first it is filled (`ENOSPC`), then
//! remounted read-only (`EROFS`). Without root the directory is made read-only (mode 0500).

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Broker, DEADLINE, Scene, Worker, count, read_hb, wait_heartbeat};
use rustix::process::Signal;
use watchkeeper::heartbeat::HealthStatus;
use watchkeeper_jobs::Request;
use watchkeeper_testkit::FakeManager;

const WARN: &str = "heartbeat not written; degraded";
const INFO: &str = "heartbeat written again";

fn run(cmd: &mut Command) -> bool {
    cmd.status().is_ok_and(|s| s.success())
}

/// A tmpfs of 256 KiB mounted for the test, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            return None;
        }
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs"])
            .arg(dir))
        .then(|| Tmpfs {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn remount(dir: &Path, opts: &str) {
    assert!(
        run(Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(dir)),
        "remount {opts} {}",
        dir.display()
    );
}

/// Fills the file system at `dir` until `ENOSPC`; returns the filler file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = [0u8; 4096];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
                return path;
            }
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

/// How the heartbeat is made unwritable, and how it is fixed again.
enum Fault {
    DiskFull {
        fs: PathBuf,
        filler: Option<PathBuf>,
    },
    ReadOnlyMount {
        fs: PathBuf,
    },
    ReadOnlyDir {
        dir: PathBuf,
    },
}

impl Fault {
    /// What the error names.
    fn error_text(&self) -> &'static str {
        match self {
            Fault::DiskFull { .. } => "No space left on device",
            Fault::ReadOnlyMount { .. } => "Read-only file system",
            Fault::ReadOnlyDir { .. } => "Permission denied",
        }
    }

    fn inject(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        match self {
            Fault::DiskFull { fs, filler } => *filler = Some(fill(fs)),
            Fault::ReadOnlyMount { fs } => remount(fs, "ro"),
            Fault::ReadOnlyDir { dir } => {
                std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o500)).unwrap();
            }
        }
    }

    fn repair(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        match self {
            Fault::DiskFull { filler, .. } => {
                std::fs::remove_file(filler.take().unwrap()).unwrap();
            }
            Fault::ReadOnlyMount { fs } => remount(fs, "rw"),
            Fault::ReadOnlyDir { dir } => {
                std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            }
        }
    }
}

fn claims(broker: &Broker) -> usize {
    count(&broker.received(), |r| matches!(r, Request::Claim { .. }))
}

#[test]
fn an_unwritable_heartbeat_is_reported_degraded_once_per_episode() {
    let scene = Scene::new();
    let state = scene.path("state");
    std::fs::create_dir(&state).unwrap();
    let tmpfs = Tmpfs::mount(&state);
    let faults = match &tmpfs {
        // One mount for both episodes: the second remounts the same file system.
        Some(fs) => vec![
            Fault::DiskFull {
                fs: fs.dir.clone(),
                filler: None,
            },
            Fault::ReadOnlyMount { fs: fs.dir.clone() },
        ],
        None if !rustix::process::geteuid().is_root() => {
            eprintln!("not root: no tmpfs; the heartbeat directory is made read-only instead");
            vec![Fault::ReadOnlyDir { dir: state.clone() }]
        }
        None => panic!("running as root but cannot mount a tmpfs for the disk-full case"),
    };

    let broker = Broker::start(&scene.socket());
    let manager = FakeManager::start().unwrap();
    let config = scene.config(&["echo"], "");
    let worker = Worker::start(&manager, None, &scene.args(&config));
    manager.wait_ready(DEADLINE).unwrap();
    let hb = scene.heartbeat();
    wait_heartbeat(&hb, "health ok", |h| h.health_status == HealthStatus::Ok);

    let episodes = faults.len();
    let mut since = 0;
    for mut fault in faults {
        let written = read_hb(&hb).counter("cycle_count");
        fault.inject();
        let degraded = manager
            .wait_for_since(
                since,
                "STATUS=degraded: heartbeat not written",
                DEADLINE,
                |r| {
                    r.get("STATUS").is_some_and(|s| {
                        s.starts_with("degraded: heartbeat not written: ")
                            && s.contains(fault.error_text())
                            && s.ends_with("; idle; 0 completed, 0 denied, 0 quarantined")
                    })
                },
            )
            .unwrap();
        // Many cycles (and at least one retry of the write, once a second) while it lasts.
        let before = claims(&broker);
        broker.wait_until("40 more cycles", |r| {
            count(r, |r| matches!(r, Request::Claim { .. })) >= before + 40
        });
        fault.repair();
        let recovered = manager
            .wait_for_since(degraded.seq, "STATUS=idle again", DEADLINE, |r| {
                r.get("STATUS").is_some_and(|s| s.starts_with("idle; "))
            })
            .unwrap();
        since = recovered.seq;
        wait_heartbeat(&hb, "a newer heartbeat, ok again", |h| {
            h.health_status == HealthStatus::Ok && h.counter("cycle_count") > written + 40
        });
    }

    let stderr = worker.stderr();
    assert_eq!(stderr.matches(WARN).count(), episodes, "{stderr}");
    assert_eq!(stderr.matches(INFO).count(), episodes, "{stderr}");
    assert!(
        !stderr.contains("heartbeat not written\n")
            && !stderr.contains("\"heartbeat not written\""),
        "a warning per cycle: {stderr}"
    );

    worker.signal(Signal::TERM);
    let (status, stderr) = worker.wait();
    assert!(status.success(), "{status}\n{stderr}");
    manager.wait_stopping(DEADLINE).unwrap();
    drop(tmpfs);
}
