//! `systemd-analyze verify` accepts every shipped unit without a warning: the user units as the
//! user inside a private user manager's namespace (binaries installed where the units expect
//! them), the system units as root inside a private mount namespace with its own `/run/systemd`
//! (system-mode verify writes there) and the built binaries bound on `/usr/local/bin`. And
//! `systemd-analyze security --offline=yes` rates the system units: exposure ≤ 2.0 for the
//! daemon, ≤ 3.0 for the workers.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};
use support::wk::{ROOT, SYSTEM_UNITS, USER_UNITS, Wk, built_binary};

/// Exposure limits of `systemd-analyze security` per system unit (the template is rated as
/// instance `i`).
const EXPOSURE_LIMITS: &[(&str, f64)] = &[
    ("watchkeeper-daemon.service", 2.0),
    ("watchkeeper-worker.service", 3.0),
    ("watchkeeper-worker@.service", 3.0),
];

/// A listing of the host's `/run` (names) and `/run/systemd` (names and mtime), to prove that the
/// system-mode commands left the host untouched.
fn host_run_snapshot() -> Result<String> {
    let mut out = String::new();
    for dir in ["/run", "/run/systemd"] {
        let Ok(entries) = fs::read_dir(dir) else {
            out.push_str(&format!("{dir}: missing\n"));
            continue;
        };
        let mut names: Vec<String> = entries
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        names.sort();
        if dir == "/run/systemd" {
            let mtime = fs::metadata(dir)?.modified()?;
            out.push_str(&format!("{dir} {mtime:?}: {names:?}\n"));
        } else {
            out.push_str(&format!("{dir}: {names:?}\n"));
        }
    }
    Ok(out)
}

#[test]
fn shipped_units_verify_and_system_units_are_hardened() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };

    // User units, as the user, in the manager's namespace (where %t, %h and %E resolve).
    let paths: Vec<String> = USER_UNITS
        .iter()
        .map(|u| wk.unit_dir().join(u).display().to_string())
        .collect();
    let mut args = vec!["--user", "verify", "--man=no"];
    args.extend(paths.iter().map(String::as_str));
    let out = wk.run("systemd-analyze", &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "systemd-analyze --user verify: {}; stderr: {stderr:?}",
        out.status
    );
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze --user verify {paths:?} ({}):\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    drop(wk);

    if !rustix::process::geteuid().is_root() {
        // The developer's own manager (WK_E2E_OWN_MANAGER=1): no root for a mount namespace.
        eprintln!(
            "SKIPPING the system units: verifying them needs root (a private mount namespace)"
        );
        return Ok(());
    }

    // System units, verbatim from contrib/, as root in a private mount namespace: a tmpfs on
    // /run/systemd (verify creates /run/systemd/systemd-units-load) and on /tmp (its temporary
    // directories), the built binaries on /usr/local/bin (the units' ExecStart=).
    let bin_dir = built_binary("watchkeeper-daemon")?
        .parent()
        .context("binary dir")?
        .to_owned();
    for b in support::wk::BINARIES {
        built_binary(b)?;
    }
    let unit_dir = Path::new(ROOT).join("contrib/systemd/system");
    let units = SYSTEM_UNITS.join(" ");
    let security = EXPOSURE_LIMITS
        .iter()
        .map(|(u, _)| {
            format!("echo '>>> {u}'; systemd-analyze security --offline=yes --no-pager {u} 2>&1")
        })
        .collect::<Vec<_>>()
        .join("; ");
    let script = format!(
        // The checkout (and so the binaries and units) may itself live under /tmp: bind the
        // binaries and copy the units (byte for byte) before /tmp is covered.
        "set -e
         mount --bind '{}' /usr/local/bin
         mount -t tmpfs -o mode=0755 tmpfs /run/systemd
         mkdir /run/systemd/wk-units
         cp '{}'/* /run/systemd/wk-units/
         mount -t tmpfs -o mode=1777 tmpfs /tmp
         cd /run/systemd/wk-units
         set +e
         systemd-analyze verify --man=no {units}
         echo \">>> verify rc=$?\" >&2
         {security}",
        bin_dir.display(),
        unit_dir.display()
    );
    let utab = tempfile::tempdir()?;
    let before = host_run_snapshot()?;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        // libmount would otherwise write the host's /run/mount/utab.
        .env("LIBMOUNT_UTAB", utab.path().join("utab"))
        .output()
        .context("running unshare")?;
    let after = host_run_snapshot()?;
    ensure!(
        before == after,
        "the host's /run changed:\nbefore: {before}\nafter: {after}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "unshare ({}): {stderr}\n{stdout}",
        out.status
    );
    ensure!(
        stderr.trim() == ">>> verify rc=0",
        "systemd-analyze verify of the system units: {stderr}"
    );
    eprintln!("systemd-analyze verify (system): rc 0, no warnings");

    // Each unit's table ends with "→ Overall exposure level for NAME: 0.4 SAFE 😀".
    let sections: Vec<&str> = stdout.split(">>> ").skip(1).collect();
    ensure!(
        sections.len() == EXPOSURE_LIMITS.len(),
        "security output: {stdout}"
    );
    for ((unit, limit), section) in EXPOSURE_LIMITS.iter().zip(sections) {
        ensure!(section.starts_with(unit), "{section}");
        let Some(line) = section
            .lines()
            .find(|l| l.contains("Overall exposure level for"))
        else {
            bail!("no exposure level for {unit}:\n{section}");
        };
        let score: f64 = line
            .split(": ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .with_context(|| format!("{line:?}"))?
            .parse()
            .with_context(|| format!("{line:?}"))?;
        eprintln!("systemd-analyze security --offline=yes {unit}: {score} (limit {limit}): {line}");
        ensure!(
            score <= *limit,
            "{unit}: exposure {score} > {limit}:\n{section}"
        );
    }
    Ok(())
}
