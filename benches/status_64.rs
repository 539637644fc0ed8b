//! `watchkeeper status --json` against 64 real `watchkeeper-worker@` instances (and the daemon
//! and its socket) under a private systemd user manager: one `list-units` and one `systemctl
//! show` call for all units, 64 heartbeat files, one ping of the daemon. See BENCHMARKS.md.
//!
//! Each sample runs the command `iters` times inside the manager's namespace as its user, in
//! one shell loop timed there (so the harness's nsenter/setpriv is not counted).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use criterion::Criterion;
use support::wk::{DAEMON, SOCKET, Wk, built_binary};

const INSTANCES: usize = 64;

fn main() {
    let wk = match Wk::start(None, None) {
        Ok(Some(wk)) => wk,
        Ok(None) => return,
        Err(e) => panic!("starting the user manager: {e:#}"),
    };
    let bin = wk.install_binary(&built_binary("watchkeeper").expect("the watchkeeper binary"));
    let names: Vec<String> = (0..INSTANCES)
        .map(|i| format!("watchkeeper-worker@w{i:02}.service"))
        .collect();
    let mut args = vec![
        "enable".to_owned(),
        "--now".to_owned(),
        SOCKET.to_owned(),
        DAEMON.to_owned(),
    ];
    args.extend(names.iter().cloned());
    wk.systemctl_ok(&args).expect("starting 64 instances");
    // Every instance running with a fresh heartbeat: status says healthy over 64 instances.
    let report = wk
        .poll(
            "64 healthy instances",
            DAEMON,
            Duration::from_secs(180),
            || {
                let out = wk.run(&bin, ["status", "--json"]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let n = v["services"].as_array().map_or(0, |s| {
                    s.iter().filter(|s| s["kind"] == "worker-instance").count()
                });
                Ok((out.status.code() == Some(0) && n == INSTANCES).then_some(v))
            },
        )
        .expect("64 healthy instances");
    assert_eq!(report["overall_health"], "healthy");

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20))
        .configure_from_args();
    c.bench_function("status_json_64_instances", |b| {
        b.iter_custom(|iters| {
            let script = format!(
                "i=0; t0=$(date +%s%N); while [ $i -lt {iters} ]; do {} status --json >/dev/null || exit 1; i=$((i+1)); done; t1=$(date +%s%N); echo $((t1 - t0))",
                bin.display()
            );
            let out = wk.run("sh", ["-c", &script]);
            assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
            let ns: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("ns");
            Duration::from_nanos(ns)
        })
    });
    c.final_summary();
}
