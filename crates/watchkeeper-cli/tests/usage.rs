//! The command line as an API: `--help` on every subcommand, usage errors exit 64, and the
//! exit codes are the documented ones where no service manager is needed.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_watchkeeper");
const SUBCOMMANDS: &[&str] = &[
    "status",
    "probe",
    "metrics",
    "install",
    "uninstall",
    "rollback",
    "doctor",
    "backup",
    "restore",
    "completions",
];

#[test]
fn every_subcommand_has_help() {
    let top = Command::new(BIN).arg("--help").output().expect("run");
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(text.contains("Exit codes"), "{text}");
    for sub in SUBCOMMANDS {
        assert!(text.contains(sub), "--help does not list {sub}: {text}");
        let out = Command::new(BIN)
            .args([sub, "--help"])
            .output()
            .expect("run");
        assert!(out.status.success(), "{sub} --help: {:?}", out.status);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: watchkeeper"),
            "{sub}"
        );
    }
}

#[test]
fn usage_errors_exit_64() {
    for args in [
        vec!["frobnicate"],
        vec!["status", "--max-age", "soon"],
        vec!["status", "--user", "--system"],
        vec!["probe"],
        vec!["restore"],
    ] {
        let out = Command::new(BIN).args(&args).output().expect("run");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
    }
}

#[test]
fn backup_without_a_store_fails_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["backup", "--state-dir"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
}
