//! The shipped deployment files outside systemd: the Kubernetes manifests pass a real schema
//! validator (`kubernetes-validate --strict`, from PyPI), every probe command in them and in the
//! Dockerfile is a valid `watchkeeper probe` command line, and the probe's exit codes on real
//! heartbeat files are the documented ones.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail, ensure};
use support::wk::{ROOT, built_binary};

const MANIFEST: &str = "contrib/kubernetes/watchkeeper.yaml";

fn validator() -> Result<Option<PathBuf>> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/local/bin"])
    {
        let p = Path::new(dir).join("kubernetes-validate");
        if p.is_file() {
            return Ok(Some(p));
        }
    }
    let why =
        "kubernetes-validate is not installed (pip install kubernetes-validate; .ci/run does)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{why}");
    }
    eprintln!("SKIPPING: {why}");
    Ok(None)
}

#[test]
fn kubernetes_manifests_pass_the_schema_validator() -> Result<()> {
    let Some(kv) = validator()? else {
        return Ok(());
    };
    let path = Path::new(ROOT).join(MANIFEST);
    let out = Command::new(&kv).arg("--strict").arg(&path).output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    ensure!(out.status.success(), "{MANIFEST}: {text}");
    ensure!(
        text.matches("passed").count() == 3,
        "three resources: {text}"
    );

    // The validator does reject a mistake (a misspelt probe field).
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.yaml");
    let src = std::fs::read_to_string(&path)?;
    ensure!(src.contains("livenessProbe:"));
    std::fs::write(&bad, src.replacen("livenessProbe:", "livenesProbe:", 1))?;
    let out = Command::new(&kv).arg("--strict").arg(&bad).output()?;
    ensure!(
        !out.status.success(),
        "the validator accepted a misspelt field"
    );
    Ok(())
}

/// The JSON arrays of `command: [...]` (manifest) and `CMD [...]` after HEALTHCHECK
/// (Dockerfile) that run `watchkeeper`.
fn probe_commands() -> Result<Vec<Vec<String>>> {
    let mut cmds = Vec::new();
    let manifest = std::fs::read_to_string(Path::new(ROOT).join(MANIFEST))?;
    for line in manifest.lines() {
        if let Some(arr) = line.trim().strip_prefix("command: [") {
            let v: Vec<String> = serde_json::from_str(&format!("[{arr}"))
                .with_context(|| format!("{MANIFEST}: {line}"))?;
            cmds.push(v);
        }
    }
    let docker = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile"))?;
    let joined = docker.replace("\\\n", " ");
    for line in joined.lines() {
        if let Some(rest) = line.trim().strip_prefix("HEALTHCHECK") {
            let arr = rest.split_once("CMD").context("HEALTHCHECK without CMD")?.1;
            cmds.push(serde_json::from_str(arr.trim()).with_context(|| line.to_owned())?);
        }
    }
    Ok(cmds)
}

#[test]
fn every_shipped_probe_is_a_valid_probe_command() -> Result<()> {
    let bin = built_binary("watchkeeper")?;
    let cmds = probe_commands()?;
    ensure!(
        cmds.len() == 5,
        "4 probes in the manifest, 1 HEALTHCHECK: {cmds:?}"
    );
    for cmd in &cmds {
        ensure!(cmd[0] == "watchkeeper" && cmd[1] == "probe", "{cmd:?}");
        // Nothing is there to probe here: "probe failed" (2), never a usage error (64).
        let out = Command::new(&bin).args(&cmd[1..]).output()?;
        ensure!(
            out.status.code() == Some(2),
            "{cmd:?}: {:?} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn dockerfile_copies_the_binaries_the_workspace_builds() -> Result<()> {
    let docker = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile"))?;
    ensure!(
        docker
            .trim_start()
            .lines()
            .find(|l| !l.starts_with('#'))
            .is_some_and(|l| l.starts_with("FROM "))
    );
    for name in [
        "watchkeeper-daemon",
        "watchkeeper-worker",
        "wk-jobs",
        "watchkeeper",
    ] {
        ensure!(
            docker.contains(&format!("/src/target/release/{name} ")),
            "Dockerfile does not copy {name}"
        );
        built_binary(name)?;
    }
    Ok(())
}

fn heartbeat(dir: &Path, name: &str, age_secs: u64, health: &str, pid: u32) -> Result<PathBuf> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let path = dir.join(name);
    let doc = serde_json::json!({
        "format_version": 1, "service": "watchkeeper-worker", "pid": pid,
        "timestamp_unix": now - age_secs, "health_status": health,
    });
    std::fs::write(&path, format!("{doc}\n"))?;
    Ok(path)
}

#[test]
fn probe_exit_codes_on_real_files() -> Result<()> {
    let bin = built_binary("watchkeeper")?;
    let dir = tempfile::tempdir()?;
    let probe = |args: &[&str]| -> Result<(i32, String)> {
        let out = Command::new(&bin).arg("probe").args(args).output()?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(line.lines().count() == 1, "one line: {line:?}");
        Ok((out.status.code().unwrap_or(-1), line))
    };
    let fresh = heartbeat(dir.path(), "fresh.json", 1, "ok", 4242)?;
    let stale = heartbeat(dir.path(), "stale.json", 500, "ok", 4242)?;
    let starting = heartbeat(dir.path(), "starting.json", 0, "starting", 4242)?;
    let stalled = heartbeat(dir.path(), "stalled.json", 0, "stalled", 4242)?;
    let corrupt = dir.path().join("corrupt.json");
    std::fs::write(&corrupt, "{\"format_version\": 1, \"serv")?;
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec!["--heartbeat".into(), s(&fresh)], 0, "ok:"),
        (
            vec![
                "--heartbeat".into(),
                s(&fresh),
                "--expect-pid".into(),
                "4242".into(),
            ],
            0,
            "ok:",
        ),
        (
            vec![
                "--heartbeat".into(),
                s(&fresh),
                "--expect-pid".into(),
                "1".into(),
            ],
            2,
            "expected 1",
        ),
        (
            vec!["--heartbeat".into(), s(&fresh), "--ready".into()],
            0,
            "ok:",
        ),
        (
            vec!["--heartbeat".into(), s(&stale)],
            2,
            "stale heartbeat, 500s old (max 120s)",
        ),
        (
            vec![
                "--heartbeat".into(),
                s(&stale),
                "--max-age".into(),
                "10m".into(),
            ],
            0,
            "ok:",
        ),
        (vec!["--heartbeat".into(), s(&starting)], 0, "ok:"),
        (
            vec!["--heartbeat".into(), s(&starting), "--ready".into()],
            2,
            "not ready",
        ),
        (vec!["--heartbeat".into(), s(&stalled)], 2, "stalled"),
        (vec!["--heartbeat".into(), s(&corrupt)], 3, "unreadable"),
        (
            vec!["--heartbeat".into(), s(&dir.path().join("none.json"))],
            2,
            "no heartbeat file",
        ),
        (
            vec!["--socket".into(), s(&dir.path().join("none.sock"))],
            2,
            "unhealthy",
        ),
    ];
    for (args, code, needle) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (got, line) = probe(&a)?;
        ensure!(
            got == code && line.contains(needle),
            "probe {a:?}: exit {got} {line:?}, want {code} {needle:?}"
        );
    }
    // Usage errors: 64.
    for bad in [vec![], vec!["--heartbeat", "x", "--max-age", "soon"]] {
        let out = Command::new(&bin).arg("probe").args(&bad).output()?;
        ensure!(
            out.status.code() == Some(64),
            "probe {bad:?}: {:?}",
            out.status
        );
    }
    Ok(())
}

#[test]
fn completions_for_each_shell() -> Result<()> {
    let bin = built_binary("watchkeeper")?;
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(&bin).args(["completions", shell]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains("probe") && text.contains("status"),
            "{shell}: {text}"
        );
    }
    let out = Command::new(&bin).args(["completions", "tcsh"]).output()?;
    ensure!(out.status.code() == Some(64));
    Ok(())
}
