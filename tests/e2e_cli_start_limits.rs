//! End to end, under a real `systemd --user`: the shipped units' start limits. Ten operator
//! restarts of the daemon one second apart all succeed and leave the socket listening; a
//! crash loop still ends (start-limit-hit), and once the daemon can start again the socket is
//! back.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use support::wk::{DAEMON, SOCKET, Wk};

const DEADLINE: Duration = Duration::from_secs(60);

fn socket_file_exists(wk: &Wk) -> bool {
    wk.run("test", ["-S", &wk.socket_path()]).status.success()
}

#[test]
fn operator_restarts_succeed_and_a_crash_loop_still_ends() -> Result<()> {
    let Some(wk) = Wk::start(None, None)? else {
        return Ok(());
    };
    wk.systemctl_ok(["start", SOCKET, DAEMON])?;
    wk.wait_for(DAEMON, "SubState", "running", DEADLINE)?;

    // Ten restarts, one second apart (the pacing is the drill itself).
    let mut ok = 0;
    let mut failures = Vec::new();
    for i in 0..10 {
        let t0 = Instant::now();
        let out = wk.systemctl(["restart", DAEMON]);
        if out.status.success() {
            ok += 1;
        } else {
            failures.push(format!(
                "restart {}: {}",
                i + 1,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t0.elapsed()));
    }
    let sock = wk.show(SOCKET, &["ActiveState", "Result"]);
    eprintln!("{ok}/10 restarts succeeded; socket {sock:?}; {failures:?}");
    ensure!(
        ok == 10,
        "{ok}/10 restarts succeeded: {failures:?}; socket {sock:?}"
    );
    ensure!(
        sock["ActiveState"] == "active",
        "socket after the restarts: {sock:?}"
    );
    ensure!(socket_file_exists(&wk), "the socket file is gone");
    wk.wk_jobs(&["stats"])?;

    // A crash loop: the daemon exits 1 at once, Restart=on-failure starts it again.
    wk.drop_in(DAEMON, "[Service]\nExecStart=\nExecStart=/bin/false\n")?;
    let t0 = Instant::now();
    let _ = wk.systemctl(["restart", DAEMON]);
    // systemd 252 logs the refusal; Result= keeps the crash's own (exit-code).
    wk.wait_journal(DAEMON, "Start request repeated too quickly", DEADLINE)?;
    wk.wait_for(DAEMON, "ActiveState", "failed", DEADLINE)?;
    let d = wk.show(DAEMON, &["ActiveState", "NRestarts"]);
    eprintln!("crash loop ended after {:?}: {d:?}", t0.elapsed());
    let restarts: u64 = d["NRestarts"].parse()?;
    ensure!(restarts <= 20, "{d:?}");

    // The fault is fixed: the daemon starts again (after reset-failed, as `doctor` says)
    // and brings its socket back.
    wk.drop_in(DAEMON, "[Service]\n")?;
    wk.systemctl_ok(["reset-failed", DAEMON, SOCKET])?;
    wk.systemctl_ok(["start", DAEMON])?;
    wk.wait_for(SOCKET, "ActiveState", "active", DEADLINE)?;
    wk.wait_for(DAEMON, "SubState", "running", DEADLINE)?;
    ensure!(socket_file_exists(&wk), "the socket file is not back");
    wk.wk_jobs(&["stats"])?;
    Ok(())
}
