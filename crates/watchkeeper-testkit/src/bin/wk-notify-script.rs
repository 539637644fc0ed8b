//! `wk-notify-script`: a service that sends a scripted sequence of datagrams to
//! `$NOTIFY_SOCKET`, for testing managers (the fake one and systemd) with exact timing, without
//! any library in between.
//!
//! The script is the arguments, or `$WK_NOTIFY_SCRIPT` split at whitespace when there are none.
//! Steps, in order:
//!
//! * `KEY=VALUE` — send this payload as one datagram (`\n`, two characters, separates
//!   assignments within it);
//! * `sleep:SECS` — sleep;
//! * `repeat:N:SECS:PAYLOAD` — N times: sleep SECS, then send PAYLOAD;
//! * `reloading` — send `RELOADING=1` with `MONOTONIC_USEC=` of now;
//! * `exit:CODE` — exit with CODE;
//! * `hang` — sleep until killed.
//!
//! After the last step it exits 0. It turns core dumps off for itself (a watchdog's SIGABRT
//! leaves no core file). Every step is logged to stderr with the time since start.
//!
//! ```text
//! wk-notify-script WATCHDOG=1 sleep:3 READY=1 STOPPING=1 exit:0
//! ```

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

#[doc(hidden)]
/// One step of the script.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Send(String),
    Sleep(Duration),
    Repeat(u32, Duration, String),
    Reloading,
    Exit(u8),
    Hang,
}

#[doc(hidden)]
fn secs(s: &str, step: &str) -> anyhow::Result<Duration> {
    s.parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .with_context(|| format!("step {step:?}: {s:?} is not a number of seconds"))
}

#[doc(hidden)]
fn parse(step: &str) -> anyhow::Result<Step> {
    if step == "hang" {
        return Ok(Step::Hang);
    }
    if step == "reloading" {
        return Ok(Step::Reloading);
    }
    if let Some(s) = step.strip_prefix("sleep:") {
        return Ok(Step::Sleep(secs(s, step)?));
    }
    if let Some(c) = step.strip_prefix("exit:") {
        let code = c
            .parse()
            .with_context(|| format!("step {step:?}: {c:?} is not an exit code (0..=255)"))?;
        return Ok(Step::Exit(code));
    }
    if let Some(rest) = step.strip_prefix("repeat:") {
        let mut parts = rest.splitn(3, ':');
        let (Some(n), Some(s), Some(payload)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("step {step:?}: expected repeat:N:SECS:PAYLOAD");
        };
        let n = n
            .parse()
            .with_context(|| format!("step {step:?}: {n:?} is not a count"))?;
        return Ok(Step::Repeat(
            n,
            secs(s, step)?,
            payload.replace("\\n", "\n"),
        ));
    }
    if step.contains('=') {
        return Ok(Step::Send(step.replace("\\n", "\n")));
    }
    bail!(
        "unknown step {step:?} (KEY=VALUE, sleep:SECS, repeat:N:SECS:PAYLOAD, reloading, \
         exit:CODE, hang)"
    )
}

#[doc(hidden)]
/// Where `$NOTIFY_SOCKET` points (`@name` is abstract, else a path).
fn notify_addr() -> anyhow::Result<SocketAddr> {
    let v = std::env::var_os("NOTIFY_SOCKET").context("NOTIFY_SOCKET is not set")?;
    let bytes = v.as_encoded_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(std::path::Path::new(&v)),
    }
    .with_context(|| format!("NOTIFY_SOCKET={v:?} is not a usable address"))
}

#[doc(hidden)]
fn run() -> anyhow::Result<u8> {
    let t0 = Instant::now();
    // No core file from a watchdog's SIGABRT.
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    let script: Vec<String> = if args.is_empty() {
        std::env::var("WK_NOTIFY_SCRIPT")
            .context("no steps given (arguments or WK_NOTIFY_SCRIPT)")?
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    } else {
        args
    };
    let steps = script
        .iter()
        .map(|s| parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addr = notify_addr()?;
    let sock = UnixDatagram::unbound().context("cannot create a datagram socket")?;
    let log = |what: &str| eprintln!("[{:>8.3}s] {what}", t0.elapsed().as_secs_f64());
    let send = |payload: &str| -> anyhow::Result<()> {
        sock.send_to_addr(payload.as_bytes(), &addr)
            .with_context(|| format!("cannot send {payload:?}"))?;
        log(&format!("sent {}", payload.replace('\n', "\\n")));
        Ok(())
    };
    for step in steps {
        match step {
            Step::Send(p) => send(&p)?,
            Step::Sleep(d) => std::thread::sleep(d),
            Step::Reloading => {
                let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
                let usec = t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1000;
                send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))?
            }
            Step::Repeat(n, d, p) => {
                for _ in 0..n {
                    std::thread::sleep(d);
                    send(&p)?;
                }
            }
            Step::Exit(code) => {
                log(&format!("exit {code}"));
                return Ok(code);
            }
            Step::Hang => {
                log("hanging");
                loop {
                    std::thread::park();
                }
            }
        }
    }
    log("exit 0");
    Ok(0)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("wk-notify-script: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_and_bad_ones_are_named() {
        assert_eq!(parse("READY=1").unwrap(), Step::Send("READY=1".into()));
        assert_eq!(
            parse("STATUS=a\\nREADY=1").unwrap(),
            Step::Send("STATUS=a\nREADY=1".into())
        );
        assert_eq!(
            parse("sleep:0.5").unwrap(),
            Step::Sleep(Duration::from_millis(500))
        );
        assert_eq!(
            parse("repeat:3:0.9:WATCHDOG=1").unwrap(),
            Step::Repeat(3, Duration::from_millis(900), "WATCHDOG=1".into())
        );
        assert_eq!(parse("exit:3").unwrap(), Step::Exit(3));
        assert_eq!(parse("hang").unwrap(), Step::Hang);
        assert_eq!(parse("reloading").unwrap(), Step::Reloading);
        for bad in ["sleep:x", "exit:300", "repeat:2:1", "nonsense"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
