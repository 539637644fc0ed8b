//! End to end, under a real `systemd --user`: the shipped worker unit, hardening included,
//! loads its credential (`LoadCredential=github-token:…`), and the worker hands it to the job
//! that asks for it as a file, whose value never shows in the unit's journal (the job prints
//! it; the worker redacts it). With the credential file missing, the unit still starts (its
//! `SetCredential=` placeholder stands in, no crash loop) and a job that asks for the
//! credential is denied with the reason.
//!
//! systemd 252's user manager sets up credentials under its mount namespacing only where
//! `/run/credentials` exists: a booted system has it (systemd as PID 1 creates it whenever it
//! starts); the harness makes it.

mod support;

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use support::wk::{GITHUB_TOKEN_JOB as JOB, SOCKET, WORKER, Wk};

const DEADLINE: Duration = Duration::from_secs(20);
const SECRET: &str = "ghp_e2eUnderTheUserManager";

const WORKER_TOML: &str = r#"allowlist = ["sh"]
poll_interval_ms = 100
credentials = ["github-token"]
"#;

#[test]
fn a_job_gets_the_units_credential_as_a_file_and_the_journal_never_shows_it() -> Result<()> {
    let Some(wk) = Wk::start(None, Some(WORKER_TOML))? else {
        return Ok(());
    };
    // The shipped unit as installed, credential lines and hardening included.
    let shipped = support::wk::read_contrib("systemd/user/watchkeeper-worker.service")?;
    ensure!(
        shipped.contains("\nLoadCredential=github-token:")
            && shipped.contains("\nSetCredential=github-token:"),
        "{shipped}"
    );
    ensure!(std::fs::read_to_string(wk.unit_dir().join(WORKER))? == shipped);
    let creds = wk.config_dir().join("credentials");
    wk.write_user_file(&creds.join("github-token"), &format!("{SECRET}\n"))?;
    wk.systemctl_ok(["start", SOCKET])?;
    wk.systemctl_ok(["start", WORKER])
        .with_context(|| wk.journal(WORKER))?;
    wk.assert_running(WORKER)?;

    wk.wk_jobs(&["submit-json", JOB])?;
    wk.poll("the job completed", WORKER, DEADLINE, || {
        let s = wk.stats()?;
        ensure!(s["failed"] == 0, "the job failed: {s:?}");
        Ok((s["completed"] == 1).then_some(()))
    })?;
    wk.wait_journal(WORKER, "the token is [redacted]", DEADLINE)?;
    wk.wait_journal(WORKER, "on stderr: [redacted]", DEADLINE)?;
    let journal = wk.journal(WORKER);
    ensure!(
        !journal.contains(SECRET),
        "the secret is in the journal:\n{journal}"
    );

    // The file gone: the unit starts all the same, and the job is denied, saying why.
    std::fs::remove_file(creds.join("github-token"))?;
    wk.systemctl_ok(["restart", WORKER])?;
    wk.assert_running(WORKER)?;
    ensure!(
        wk.prop_u64(WORKER, "NRestarts")? == 0,
        "the worker restarted by itself"
    );
    wk.wk_jobs(&["submit-json", JOB])?;
    wk.poll("the job denied", WORKER, DEADLINE, || {
        Ok((wk.stats()?["denied"] == 1).then_some(()))
    })?;
    wk.wait_journal(
        WORKER,
        "the file of the unit's LoadCredential=github-token:… is missing",
        DEADLINE,
    )?;
    wk.systemctl_ok(["stop", WORKER])?;
    Ok(())
}
