//! `watchkeeper install`, `uninstall` and `rollback`.
//!
//! The shipped files of `contrib/` are embedded as they are ([`include_str!`]); install only
//! fills in the binaries' directory. Everything install writes is recorded in a manifest
//! (`INSTALL_ROOT/manifest.json`, see [`Layout::install_root`]) with its SHA-256, so that a
//! second install recognises its own files (idempotent), refuses to overwrite a file changed
//! locally (unless `--force`), and uninstall removes exactly those.
//!
//! Binaries go to `INSTALL_ROOT/versions/VERSION-HASH/`; `current` and `previous` are symlinks
//! to the last two, and the units run `INSTALL_ROOT/current/NAME`.
//!
//! System mode creates the `watchkeeper` user with systemd-sysusers (the shipped
//! `watchkeeper.sysusers.conf`); the state directories are the units' `StateDirectory=`
//! (created by systemd with their owner and mode 0700 on start), no tmpfiles.d.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::cli::{InstallArgs, RollbackArgs, UninstallArgs};
use crate::exit;
use crate::layout::{self, Layout};
use crate::systemd::Manager;

/// The binaries installed (and the units' `ExecStart=` names).
pub(crate) const BINARIES: &[&str] = &[
    "watchkeeper-daemon",
    "watchkeeper-worker",
    "wk-jobs",
    "watchkeeper",
];

/// A shipped unit: its name and text.
type Shipped = (&'static str, &'static str);

const USER_UNITS: &[Shipped] = &[
    (
        "watchkeeper-daemon.socket",
        include_str!("../../../contrib/systemd/user/watchkeeper-daemon.socket"),
    ),
    (
        "watchkeeper-daemon.service",
        include_str!("../../../contrib/systemd/user/watchkeeper-daemon.service"),
    ),
    (
        "watchkeeper-worker.service",
        include_str!("../../../contrib/systemd/user/watchkeeper-worker.service"),
    ),
    (
        "watchkeeper-worker@.service",
        include_str!("../../../contrib/systemd/user/watchkeeper-worker@.service"),
    ),
    (
        "watchkeeper-metrics.service",
        include_str!("../../../contrib/systemd/user/watchkeeper-metrics.service"),
    ),
    (
        "watchkeeper-metrics.timer",
        include_str!("../../../contrib/systemd/user/watchkeeper-metrics.timer"),
    ),
];

const SYSTEM_UNITS: &[Shipped] = &[
    (
        "watchkeeper-daemon.socket",
        include_str!("../../../contrib/systemd/system/watchkeeper-daemon.socket"),
    ),
    (
        "watchkeeper-daemon.service",
        include_str!("../../../contrib/systemd/system/watchkeeper-daemon.service"),
    ),
    (
        "watchkeeper-worker.service",
        include_str!("../../../contrib/systemd/system/watchkeeper-worker.service"),
    ),
    (
        "watchkeeper-worker@.service",
        include_str!("../../../contrib/systemd/system/watchkeeper-worker@.service"),
    ),
    (
        "watchkeeper-metrics.service",
        include_str!("../../../contrib/systemd/system/watchkeeper-metrics.service"),
    ),
    (
        "watchkeeper-metrics.timer",
        include_str!("../../../contrib/systemd/system/watchkeeper-metrics.timer"),
    ),
];

const SYSUSERS: &str = include_str!("../../../contrib/systemd/system/watchkeeper.sysusers.conf");

/// Configurations written when absent, never overwritten.
const CONFIGS: &[Shipped] = &[
    (
        "daemon.toml",
        include_str!("../../../contrib/config/daemon.toml"),
    ),
    (
        "worker.toml",
        include_str!("../../../contrib/config/worker.toml"),
    ),
    (
        "daemon.env",
        "# Environment of watchkeeper-daemon.service (EnvironmentFile=), e.g. RUST_LOG=debug\n",
    ),
    (
        "worker.env",
        "# Environment of the watchkeeper-worker units (EnvironmentFile=), e.g. RUST_LOG=debug\n",
    ),
];

/// The units `--enable`/`--now` act on.
const ENABLE: &[&str] = &[layout::SOCKET, layout::DAEMON, layout::WORKER];

/// The manifest's format.
const MANIFEST_FORMAT: u32 = 1;

/// What install wrote.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    manager: String,
    /// The installed binaries' version directory name.
    version: String,
    previous_version: Option<String>,
    /// Files install wrote (units, sysusers), with their SHA-256.
    files: Vec<Written>,
    /// Configurations and environment files install created (kept unless `--purge`).
    configs: Vec<String>,
    /// Units install enabled.
    enabled: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Written {
    path: String,
    sha256: String,
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn manifest_path(l: &Layout) -> PathBuf {
    l.install_root().join("manifest.json")
}

fn read_manifest(l: &Layout) -> Result<Option<Manifest>> {
    let p = manifest_path(l);
    match fs::read(&p) {
        Ok(b) => {
            let m: Manifest = serde_json::from_slice(&b).with_context(|| {
                format!("{}: not a manifest of watchkeeper install", p.display())
            })?;
            if m.format > MANIFEST_FORMAT {
                bail!(
                    "{}: manifest format {} is newer than this program's",
                    p.display(),
                    m.format
                );
            }
            Ok(Some(m))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, renamed over it.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".wk-install.")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_manifest(l: &Layout, m: &Manifest) -> Result<()> {
    let mut text = serde_json::to_vec_pretty(m)?;
    text.push(b'\n');
    write_atomic(&manifest_path(l), &text, 0o644)
}

/// `path` becomes a symlink to `target`, atomically.
fn symlink_atomic(target: &Path, path: &Path) -> Result<()> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("symlink {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// The unit text with the binaries' directory filled in.
fn fill_in(text: &str, user: bool, bin: &Path) -> String {
    let shipped = if user {
        "%h/.local/bin/"
    } else {
        "/usr/local/bin/"
    };
    text.replace(shipped, &format!("{}/", bin.display()))
}

/// Copies the binaries of `src` into a new version directory (or finds it there already);
/// returns its name.
fn install_binaries(l: &Layout, src: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut blobs = Vec::new();
    for name in BINARIES {
        let p = src.join(name);
        let bytes = fs::read(&p).with_context(|| {
            format!(
                "{} is missing: --bin-dir must hold {}",
                p.display(),
                BINARIES.join(", ")
            )
        })?;
        hasher.update(name.as_bytes());
        hasher.update(&bytes);
        blobs.push((name, bytes));
    }
    let hash: String = hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let version = format!("{}-{hash}", env!("CARGO_PKG_VERSION"));
    let versions = l.install_root().join("versions");
    let dir = versions.join(&version);
    if !dir.is_dir() {
        fs::create_dir_all(&versions)?;
        let tmp = versions.join(format!(".{version}.tmp"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        for (name, bytes) in &blobs {
            write_atomic(&tmp.join(name), bytes, 0o755)?;
        }
        fs::rename(&tmp, &dir).with_context(|| format!("renaming to {}", dir.display()))?;
    }
    Ok(version)
}

fn current_version(l: &Layout, link: &str) -> Option<String> {
    fs::read_link(l.install_root().join(link))
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// `install`.
pub(crate) fn install(args: &InstallArgs) -> Result<u8> {
    let m = Manager {
        user: args.manager.is_user(),
    };
    let l = Layout::new(m.user);
    m.reachable()?;
    if !m.user && !rustix::process::geteuid().is_root() {
        return Err(exit::coded(exit::FAILED, "install --system needs root"));
    }
    if args.linger {
        if !m.user {
            return Err(exit::coded(exit::USAGE, "--linger is for --user installs"));
        }
        enable_linger()?;
    }
    let old = read_manifest(&l)?;
    let src = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .to_owned(),
    };
    let bin = l.install_root().join("current");
    let units = if m.user { USER_UNITS } else { SYSTEM_UNITS };
    let mut planned: Vec<(PathBuf, Vec<u8>, u32)> = units
        .iter()
        .map(|(name, text)| {
            (
                l.unit_dir().join(name),
                fill_in(text, m.user, &bin).into_bytes(),
                0o644,
            )
        })
        .collect();
    if !m.user {
        planned.push((
            PathBuf::from("/etc/sysusers.d/watchkeeper.conf"),
            SYSUSERS.as_bytes().to_vec(),
            0o644,
        ));
    }

    // First check every file, then write: a refusal leaves everything as it was.
    let ours = |path: &Path, sha: &str| {
        old.as_ref().is_some_and(|o| {
            o.files
                .iter()
                .any(|w| Path::new(&w.path) == path && w.sha256 == sha)
        })
    };
    let mut changed_locally = Vec::new();
    for (path, bytes, _) in &planned {
        if let Ok(existing) = fs::read(path) {
            let sha = sha256(&existing);
            if existing != *bytes && !ours(path, &sha) {
                changed_locally.push(path.display().to_string());
            }
        }
    }
    if !changed_locally.is_empty() && !args.force {
        return Err(exit::coded(
            exit::REFUSED,
            format!(
                "refusing to overwrite {} (changed locally, or not written by watchkeeper \
                 install): keep your change in a drop-in (UNIT.d/*.conf), or run again with --force",
                changed_locally.join(", ")
            ),
        ));
    }

    let version = install_binaries(&l, &src)?;
    let cur = current_version(&l, "current");
    let mut previous = old.as_ref().and_then(|o| o.previous_version.clone());
    let new_version = cur.as_deref() != Some(version.as_str());
    if new_version {
        if let Some(c) = &cur {
            symlink_atomic(
                &Path::new("versions").join(c),
                &l.install_root().join("previous"),
            )?;
            previous = Some(c.clone());
        }
        symlink_atomic(&Path::new("versions").join(&version), &bin)?;
        println!(
            "binaries: {version} in {}",
            l.install_root().join("versions").join(&version).display()
        );
    } else {
        println!("binaries: {version} (already current)");
    }

    let mut files = Vec::new();
    for (path, bytes, mode) in &planned {
        let same = fs::read(path).is_ok_and(|e| e == *bytes);
        if same {
            println!("unchanged {}", path.display());
        } else {
            write_atomic(path, bytes, *mode)?;
            println!("wrote {}", path.display());
        }
        files.push(Written {
            path: path.display().to_string(),
            sha256: sha256(bytes),
        });
    }

    let mut configs = old.as_ref().map(|o| o.configs.clone()).unwrap_or_default();
    let cdir = l.config_dir();
    fs::create_dir_all(&cdir).with_context(|| format!("creating {}", cdir.display()))?;
    for (name, text) in CONFIGS {
        let p = cdir.join(name);
        if p.exists() {
            println!("kept {} (exists)", p.display());
            continue;
        }
        // The environment files may hold secrets one day: 0600 (0640 root:watchkeeper would
        // need the group; the system units read them as root before dropping privileges).
        let mode = if name.ends_with(".env") { 0o600 } else { 0o644 };
        write_atomic(&p, text.as_bytes(), mode)?;
        println!("created {}", p.display());
        configs.push(p.display().to_string());
    }
    if !m.user {
        run_cmd(
            Command::new("systemd-sysusers").arg("/etc/sysusers.d/watchkeeper.conf"),
            "create the watchkeeper user",
        )?;
        println!("systemd-sysusers: user watchkeeper");
    }

    let mut manifest = Manifest {
        format: MANIFEST_FORMAT,
        manager: if m.user { "user" } else { "system" }.to_owned(),
        version: version.clone(),
        previous_version: previous,
        files,
        configs,
        enabled: old.map(|o| o.enabled).unwrap_or_default(),
    };
    write_manifest(&l, &manifest)?;
    m.run_ok(&["daemon-reload"])?;
    println!("{}", m.cmd_line("daemon-reload"));
    if args.enable {
        let mut a = vec!["enable"];
        if args.now {
            a.push("--now");
        }
        a.extend(ENABLE);
        m.run_ok(&a)?;
        println!("{}", m.cmd_line(&a.join(" ")));
        for u in ENABLE {
            if !manifest.enabled.iter().any(|e| e == u) {
                manifest.enabled.push((*u).to_owned());
            }
        }
        write_manifest(&l, &manifest)?;
    } else if args.now {
        let mut a = vec!["start"];
        a.extend(ENABLE);
        m.run_ok(&a)?;
        println!("{}", m.cmd_line(&a.join(" ")));
    }
    if new_version && cur.is_some() {
        restart_running(m)?;
    }
    Ok(exit::OK)
}

/// `loginctl enable-linger` for the calling user, or an error naming what to run instead.
fn enable_linger() -> Result<()> {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| rustix::process::getuid().as_raw().to_string());
    let out = Command::new("loginctl")
        .args(["enable-linger", &user])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            println!("loginctl enable-linger {user}");
            Ok(())
        }
        Ok(o) => Err(exit::coded(
            exit::FAILED,
            format!(
                "cannot enable linger for {user} ({}): ask root to run `loginctl enable-linger {user}`, then install again",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        )),
        Err(e) => Err(exit::coded(
            exit::FAILED,
            format!(
                "cannot run loginctl ({e}): ask root to run `loginctl enable-linger {user}`, then install again"
            ),
        )),
    }
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} to {what}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}), cannot {what}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Restarts the daemon and the workers that run (`try-restart`), so that they run the
/// current binaries.
fn restart_running(m: Manager) -> Result<()> {
    let mut units: Vec<String> = vec![layout::DAEMON.to_owned(), layout::WORKER.to_owned()];
    units.extend(m.list_units(layout::WORKER_INSTANCES)?);
    let mut a = vec!["try-restart"];
    a.extend(units.iter().map(String::as_str));
    m.run_ok(&a)?;
    println!("{}", m.cmd_line(&a.join(" ")));
    Ok(())
}

/// `rollback`.
pub(crate) fn rollback(args: &RollbackArgs) -> Result<u8> {
    let m = Manager {
        user: args.manager.is_user(),
    };
    let l = Layout::new(m.user);
    m.reachable()?;
    let Some(mut manifest) = read_manifest(&l)? else {
        return Err(exit::coded(
            exit::FAILED,
            format!("nothing installed: no {}", manifest_path(&l).display()),
        ));
    };
    let (Some(cur), Some(prev)) = (
        current_version(&l, "current"),
        current_version(&l, "previous"),
    ) else {
        return Err(exit::coded(
            exit::FAILED,
            format!(
                "no previous version to roll back to in {}",
                l.install_root().display()
            ),
        ));
    };
    if !l.install_root().join("versions").join(&prev).is_dir() {
        bail!(
            "the previous version {prev} is gone from {}",
            l.install_root().display()
        );
    }
    symlink_atomic(
        &Path::new("versions").join(&prev),
        &l.install_root().join("current"),
    )?;
    symlink_atomic(
        &Path::new("versions").join(&cur),
        &l.install_root().join("previous"),
    )?;
    manifest.version = prev.clone();
    manifest.previous_version = Some(cur.clone());
    write_manifest(&l, &manifest)?;
    println!("current: {prev} (was {cur})");
    restart_running(m)?;
    Ok(exit::OK)
}

/// `uninstall`.
pub(crate) fn uninstall(args: &UninstallArgs) -> Result<u8> {
    let m = Manager {
        user: args.manager.is_user(),
    };
    let l = Layout::new(m.user);
    m.reachable()?;
    let manifest = read_manifest(&l)?;
    if let Some(man) = &manifest {
        let mut units: Vec<String> = man
            .files
            .iter()
            .filter_map(|w| {
                let p = Path::new(&w.path);
                (p.parent() == Some(l.unit_dir().as_path()))
                    .then(|| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .flatten()
            })
            .filter(|u| !u.contains("@."))
            .collect();
        units.extend(m.list_units(layout::WORKER_INSTANCES)?);
        let mut a = vec!["disable", "--now"];
        a.extend(units.iter().map(String::as_str));
        // Instances that were never enabled make disable complain; stopping is what counts.
        let _ = m.run(&a)?;
        println!("{}", m.cmd_line(&a.join(" ")));
        let mut stop = vec!["stop"];
        stop.extend(units.iter().map(String::as_str));
        m.run_ok(&stop)?;
        for w in &man.files {
            match fs::remove_file(&w.path) {
                Ok(()) => println!("removed {}", w.path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", w.path)),
            }
        }
        let root = l.install_root();
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        println!("removed {}", root.display());
        m.run_ok(&["daemon-reload"])?;
        let mut rf = vec!["reset-failed"];
        rf.extend(units.iter().map(String::as_str));
        let _ = m.run(&rf)?;
        println!("{}", m.cmd_line("daemon-reload"));
    } else {
        println!("nothing installed: no {}", manifest_path(&l).display());
    }
    if args.purge {
        let mut dirs = vec![l.config_dir()];
        for name in [
            "watchkeeper-daemon",
            "watchkeeper-worker",
            "watchkeeper-metrics",
        ] {
            dirs.push(l.state_dir(name));
        }
        for d in dirs {
            match fs::remove_dir_all(&d) {
                Ok(()) => println!("purged {}", d.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", d.display())),
            }
        }
    } else if manifest.is_some() {
        println!(
            "kept the state, {} and the environment files (--purge removes them)",
            l.config_dir().display()
        );
    }
    Ok(exit::OK)
}
