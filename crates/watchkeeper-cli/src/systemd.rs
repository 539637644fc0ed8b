//! Asking the service manager, through `systemctl` (its output for `show` is a stable,
//! documented `KEY=VALUE` format; a D-Bus client would add a dependency for the same facts).

use std::collections::HashMap;
use std::process::{Command, Output};

use anyhow::{Context as _, Result};

use crate::exit;

/// One unit's properties, as `systemctl show` printed them.
pub(crate) type Props = HashMap<String, String>;

/// The user's or the system's manager.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Manager {
    pub(crate) user: bool,
}

impl Manager {
    /// `--user` or `--system`, for messages and commands the operator should run.
    pub(crate) fn flag(self) -> &'static str {
        if self.user { "--user" } else { "--system" }
    }

    /// `systemctl --user|--system ARGS`, as the operator would type it.
    pub(crate) fn cmd_line(self, args: &str) -> String {
        if self.user {
            format!("systemctl --user {args}")
        } else {
            format!("systemctl {args}")
        }
    }

    /// Runs `systemctl FLAG ARGS...`; an error (exit code [`exit::CANNOT_ASK`]) only when it
    /// cannot be started.
    pub(crate) fn run(self, args: &[&str]) -> Result<Output> {
        Command::new("systemctl")
            .arg(self.flag())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| exit::coded(exit::CANNOT_ASK, format!("cannot run systemctl: {e}")))
    }

    /// Like [`Self::run`], but a failure is an error with systemctl's message.
    pub(crate) fn run_ok(self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            anyhow::bail!(
                "`{}` failed ({}): {}",
                self.cmd_line(&args.join(" ")),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the manager answers; an error (exit code [`exit::CANNOT_ASK`]) naming what the
    /// operator should do when it does not.
    pub(crate) fn reachable(self) -> Result<()> {
        let out = self.run(&["is-system-running"])?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        // is-system-running exits non-zero for `degraded` or `starting` too: only no answer
        // (or `offline`) means nobody is there.
        if state.is_empty() || state == "offline" {
            let hint = if self.user {
                "log in as the user (or enable linger as root: `loginctl enable-linger USER`) \
                 and make sure XDG_RUNTIME_DIR=/run/user/UID is set"
            } else {
                "this needs a running systemd as PID 1"
            };
            return Err(exit::coded(
                exit::CANNOT_ASK,
                format!(
                    "no {} service manager answers (`{}`: {}): {hint}",
                    if self.user { "user" } else { "system" },
                    self.cmd_line("is-system-running"),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    /// The loaded units matching `pattern` (`systemctl list-units --all`), sorted.
    pub(crate) fn list_units(self, pattern: &str) -> Result<Vec<String>> {
        let out = self.run(&[
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            "--no-pager",
            pattern,
        ])?;
        if !out.status.success() {
            return Err(exit::coded(
                exit::CANNOT_ASK,
                format!(
                    "`{}` failed: {}",
                    self.cmd_line(&format!("list-units {pattern}")),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let mut units: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            // A failed unit's line starts with a bullet.
            .map(|w| w.trim_start_matches(['●', '*']).to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if units.iter().any(String::is_empty) {
            units.retain(|u| !u.is_empty());
        }
        units.sort();
        units.dedup();
        Ok(units)
    }

    /// `systemctl show -p P1,P2,... UNIT...` in one call: one map per unit, in order.
    pub(crate) fn show(self, units: &[String], props: &[&str]) -> Result<Vec<Props>> {
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let mut props: Vec<&str> = props.to_vec();
        if !props.contains(&"Id") {
            props.push("Id");
        }
        let plist = props.join(",");
        let mut args = vec!["show", "--no-pager", "-p", plist.as_str()];
        args.extend(units.iter().map(String::as_str));
        let out = self.run(&args)?;
        if !out.status.success() {
            return Err(exit::coded(
                exit::CANNOT_ASK,
                format!(
                    "`{}` failed: {}",
                    self.cmd_line("show ..."),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let text = String::from_utf8(out.stdout).context("systemctl show: not UTF-8")?;
        let blocks = parse_show(&text);
        if blocks.len() != units.len() {
            return Err(exit::coded(
                exit::CANNOT_ASK,
                format!(
                    "systemctl show: {} blocks for {} units",
                    blocks.len(),
                    units.len()
                ),
            ));
        }
        Ok(blocks)
    }
}

/// Blocks of `KEY=VALUE` lines separated by empty lines.
pub(crate) fn parse_show(text: &str) -> Vec<Props> {
    let mut blocks = Vec::new();
    let mut cur = Props::new();
    for line in text.lines() {
        if line.is_empty() {
            if !cur.is_empty() {
                blocks.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            cur.insert(k.to_owned(), v.to_owned());
        }
    }
    if !cur.is_empty() {
        blocks.push(cur);
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_blocks_split_on_empty_lines() {
        let b = parse_show("Id=a.service\nStatusText=x=y\n\nId=b.socket\nMainPID=0\n");
        assert_eq!(b.len(), 2);
        assert_eq!(b[0]["StatusText"], "x=y");
        assert_eq!(b[1]["Id"], "b.socket");
    }
}
