//! `watchkeeper install --system` under a real system manager: not run yet, and it says so.
//!
//! A system manager can run here as PID 1 of a private namespace, but its root file system is
//! the host's, read-write: `install --system` writes `/etc/systemd/system`, `/etc/sysusers.d`,
//! `/etc/watchkeeper`, `/usr/local/lib/watchkeeper` and runs `systemd-sysusers`, which edits
//! `/etc/passwd`, `/etc/group` and `/etc/shadow`. Running it there needs private mounts over
//! each of those first (copies of the account files bound over the originals), which this
//! suite's harness does not set up yet. The user-mode install is tested end to end in
//! `e2e_cli_install.rs`; the system units are checked by `systemd-analyze verify` and
//! `security` in `e2e_unit_verify.rs`.

#[test]
fn system_install_under_a_system_manager() {
    eprintln!(
        "SKIPPING: install --system under a real system manager is not tested: the private \
         system manager shares the host's root file system, and install --system (units in \
         /etc/systemd/system, systemd-sysusers editing /etc/passwd) would change the host; \
         the harness has no private mounts for those paths yet"
    );
}
