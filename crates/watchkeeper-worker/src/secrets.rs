//! Credentials for jobs: a job asks for them by name in its spec, the worker reads them from its
//! own `$CREDENTIALS_DIRECTORY` (the unit's `LoadCredential=`), hands each to the job as a
//! private file (mode 0600 in a directory of mode 0700, removed when the job ends) whose path is
//! in `WK_CREDENTIAL_<NAME>`, and redacts their values from the job's output.
//!
//! A secret never goes into the job's environment values or command line, nor into a log line
//! of the worker: only its name and its file's path do.
//!
//! ```json
//! {"command": ["publish-release"], "timeout_secs": 300, "credentials": ["github-token"]}
//! ```

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use watchkeeper::credentials::{CredentialError, Credentials};

/// The spec key that lists the credentials a job asks for.
pub(crate) const SPEC_KEY: &str = "credentials";

/// The prefix of the variable that holds a credential file's path.
pub(crate) const ENV_PREFIX: &str = "WK_CREDENTIAL_";

/// What replaces a secret in a job's output.
pub(crate) const REDACTED: &[u8] = b"[redacted]";

/// The placeholder the shipped units set with `SetCredential=` beside each `LoadCredential=`:
/// systemd uses it when the file is missing (instead of failing the start), and the worker
/// takes it for "not available here". systemd 252 refuses an empty `SetCredential=` value.
pub(crate) const MISSING_PLACEHOLDER: &str = "watchkeeper-credential-missing";

/// The most credentials one job may ask for.
const MAX_PER_JOB: usize = 16;

/// `WK_CREDENTIAL_<NAME>` for credential `name`: upper case, every byte that is not an ASCII
/// letter or digit replaced by `_` (`github-token` → `WK_CREDENTIAL_GITHUB_TOKEN`).
pub(crate) fn env_var(name: &str) -> String {
    let mut var = String::with_capacity(ENV_PREFIX.len() + name.len());
    var.push_str(ENV_PREFIX);
    var.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        }
    }));
    var
}

/// Whether systemd accepts `name` as a credential name: a file name of 1 to 255 bytes.
pub(crate) fn name_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.contains(['/', '\0'])
        && name != "."
        && name != ".."
}

/// Splits the credential names out of a job's spec, leaving the rest for
/// [`watchkeeper_jobs::JobSpec::parse`]. A malformed list is the job's fault (quarantine).
pub(crate) fn split_spec(
    spec: &serde_json::Value,
) -> Result<(serde_json::Value, Vec<String>), String> {
    let Some(object) = spec.as_object() else {
        return Ok((spec.clone(), Vec::new()));
    };
    let Some(list) = object.get(SPEC_KEY) else {
        return Ok((spec.clone(), Vec::new()));
    };
    let bad = |why: &str| format!("{SPEC_KEY}: {why}");
    let list = list
        .as_array()
        .ok_or_else(|| bad("must be a list of credential names"))?;
    if list.len() > MAX_PER_JOB {
        return Err(bad(&format!("at most {MAX_PER_JOB} credentials per job")));
    }
    let mut names: Vec<String> = Vec::with_capacity(list.len());
    for item in list {
        let name = item
            .as_str()
            .ok_or_else(|| bad("must be a list of credential names"))?;
        if !name_valid(name) {
            return Err(bad(&format!(
                "invalid credential name {name:?}: must be 1 to 255 bytes, without '/', and not . or .."
            )));
        }
        if let Some(other) = names.iter().find(|n| env_var(n) == env_var(name)) {
            return Err(bad(&format!(
                "{other:?} and {name:?} would both be passed in {}",
                env_var(name)
            )));
        }
        names.push(name.to_owned());
    }
    let mut rest = object.clone();
    rest.remove(SPEC_KEY);
    Ok((serde_json::Value::Object(rest), names))
}

/// One credential read for a job.
pub(crate) struct Secret {
    pub(crate) name: String,
    value: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value.
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("len", &self.value.len())
            .finish()
    }
}

impl Secret {
    /// A secret with this value (for tests and for callers that read it themselves).
    #[cfg(test)]
    pub(crate) fn new(name: &str, value: &[u8]) -> Self {
        Secret {
            name: name.to_owned(),
            value: value.to_vec(),
        }
    }

    /// What is redacted from the job's output: the value without one trailing newline (a
    /// secret written with `echo`), when that leaves something.
    fn pattern(&self) -> Option<&[u8]> {
        let v = self.value.as_slice();
        let v = v
            .strip_suffix(b"\r\n")
            .or_else(|| v.strip_suffix(b"\n"))
            .unwrap_or(v);
        (!v.is_empty()).then_some(v)
    }
}

/// Why a job's credential cannot be handed to it: this worker lacks it (the job is denied
/// here, with a reason that says what to add).
pub(crate) fn read(creds: &Credentials, names: &[String]) -> Result<Vec<Secret>, String> {
    names
        .iter()
        .map(|name| match creds.read(name) {
            Ok(value) if value.trim_ascii() == MISSING_PLACEHOLDER.as_bytes() => Err(format!(
                "credential {name:?} is not available: the file of the unit's \
                 LoadCredential={name}:… is missing (systemd passed the SetCredential= \
                 placeholder)"
            )),
            Ok(value) if value.is_empty() => {
                Err(format!("credential {name:?} is empty on this worker"))
            }
            Ok(value) => Ok(Secret {
                name: name.clone(),
                value,
            }),
            Err(e @ (CredentialError::NotConfigured { .. } | CredentialError::NotFound { .. })) => {
                Err(e.to_string())
            }
            Err(e) => Err(crate::chain(&e)),
        })
        .collect()
}

/// The files handed to one job; the directory and its files are removed on drop.
#[derive(Debug)]
pub(crate) struct JobFiles {
    /// Held for its drop, which removes the directory.
    #[cfg_attr(not(test), allow(dead_code))]
    dir: tempfile::TempDir,
    /// `(variable, path)` for the job's environment.
    pub(crate) env: Vec<(String, PathBuf)>,
}

impl JobFiles {
    /// Writes each secret to `<private dir>/<name>`, mode 0600, in a new directory of mode 0700
    /// under `base`.
    pub(crate) fn write(base: &Path, job: u64, secrets: &[Secret]) -> std::io::Result<Self> {
        // tempfile: a well-kept crate that creates the directory 0700 with a unique name.
        let dir = tempfile::Builder::new()
            .prefix(&format!("wk-job-{job}-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(base)?;
        // Whatever the umask did.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let mut env = Vec::with_capacity(secrets.len());
        for s in secrets {
            let path = dir.path().join(&s.name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(&s.value)?;
            file.sync_all()?;
            env.push((env_var(&s.name), path));
        }
        Ok(JobFiles { dir, env })
    }

    /// The private directory.
    #[cfg(test)]
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Replaces every occurrence of the secrets in a stream of bytes by [`REDACTED`], also when a
/// secret is split between two reads: bytes that may be the start of a secret are held back
/// until the next read (or the end) tells.
#[derive(Debug)]
pub(crate) struct Redactor {
    patterns: Vec<Vec<u8>>,
    held: Vec<u8>,
}

impl Redactor {
    pub(crate) fn new(secrets: &[Secret]) -> Self {
        let mut patterns: Vec<Vec<u8>> = secrets
            .iter()
            .filter_map(|s| s.pattern().map(<[u8]>::to_vec))
            .collect();
        // Longest first: a secret that contains another is redacted whole.
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Redactor {
            patterns,
            held: Vec::new(),
        }
    }

    /// Feeds `data`; returns what can be written now.
    pub(crate) fn push(&mut self, data: &[u8]) -> Vec<u8> {
        self.held.extend_from_slice(data);
        self.drain(false)
    }

    /// The end of the stream: everything held.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        self.drain(true)
    }

    fn drain(&mut self, end: bool) -> Vec<u8> {
        let buf = std::mem::take(&mut self.held);
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'scan: while i < buf.len() {
            let rest = &buf[i..];
            if !end
                && self
                    .patterns
                    .iter()
                    .any(|p| p.len() > rest.len() && p.starts_with(rest))
            {
                // Perhaps the start of a secret (or of a longer one than matches now): wait for
                // more.
                self.held = rest.to_vec();
                return out;
            }
            for p in &self.patterns {
                if rest.starts_with(p) {
                    out.extend_from_slice(REDACTED);
                    i += p.len();
                    continue 'scan;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }
}

/// Copies `from` to `to` through a [`Redactor`] until the end of `from`.
pub(crate) async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut redactor: Redactor,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let out = redactor.push(&buf[..n]);
        if to.write_all(&out).await.is_err() {
            // Keep reading, so the job does not block on a full pipe.
            continue;
        }
        let _ = to.flush().await;
    }
    let out = redactor.finish();
    let _ = to.write_all(&out).await;
    let _ = to.flush().await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn env_var_names() {
        assert_eq!(env_var("github-token"), "WK_CREDENTIAL_GITHUB_TOKEN");
        assert_eq!(env_var("db.pass_1"), "WK_CREDENTIAL_DB_PASS_1");
    }

    #[test]
    fn the_spec_lists_credentials_by_name() {
        let (rest, names) =
            split_spec(&json!({"command": ["x"], "credentials": ["a", "b-c"]})).unwrap();
        assert_eq!(rest, json!({"command": ["x"]}));
        assert_eq!(names, ["a", "b-c"]);
        let (rest, names) = split_spec(&json!({"command": ["x"]})).unwrap();
        assert_eq!(rest, json!({"command": ["x"]}));
        assert!(names.is_empty());
        for (bad, why) in [
            (json!({"command": ["x"], "credentials": "a"}), "list"),
            (json!({"command": ["x"], "credentials": [1]}), "list"),
            (
                json!({"command": ["x"], "credentials": ["../a"]}),
                "invalid credential name",
            ),
            (
                json!({"command": ["x"], "credentials": [".."]}),
                "invalid credential name",
            ),
            (
                json!({"command": ["x"], "credentials": ["a-b", "a.b"]}),
                "WK_CREDENTIAL_A_B",
            ),
        ] {
            let e = split_spec(&bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn credentials_are_read_from_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), b"s3cret\n").unwrap();
        std::fs::write(dir.path().join("empty"), b"").unwrap();
        std::fs::write(dir.path().join("unset"), MISSING_PLACEHOLDER).unwrap();
        let creds = Credentials::new(Some(dir.path().to_owned()));
        let secrets = read(&creds, &["token".into()]).unwrap();
        assert_eq!(secrets[0].pattern(), Some(&b"s3cret"[..]));
        // Debug output never shows the value.
        assert!(!format!("{secrets:?}").contains("s3cret"));
        let e = read(&creds, &["absent".into()]).unwrap_err();
        assert!(
            e.contains("\"absent\" not found") && e.contains("LoadCredential="),
            "{e}"
        );
        let e = read(&creds, &["empty".into()]).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = read(&creds, &["unset".into()]).unwrap_err();
        assert!(
            e.contains("not available") && e.contains("LoadCredential=unset:"),
            "{e}"
        );
        let e = read(&Credentials::new(None), &["token".into()]).unwrap_err();
        assert!(e.contains("CREDENTIALS_DIRECTORY"), "{e}");
    }

    #[test]
    fn job_files_are_private_and_removed() {
        let base = tempfile::tempdir().unwrap();
        let secrets = [Secret::new("github-token", b"tok\n")];
        let files = JobFiles::write(base.path(), 7, &secrets).unwrap();
        let dir = files.dir().to_owned();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let (var, path) = &files.env[0];
        assert_eq!(var, "WK_CREDENTIAL_GITHUB_TOKEN");
        assert_eq!(path, &dir.join("github-token"));
        assert_eq!(
            std::fs::metadata(path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(path).unwrap(), b"tok\n");
        drop(files);
        assert!(!dir.exists());
    }

    fn redact_in_pieces(secrets: &[Secret], input: &[u8], piece: usize) -> Vec<u8> {
        let mut r = Redactor::new(secrets);
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            out.extend(r.push(chunk));
        }
        out.extend(r.finish());
        out
    }

    #[test]
    fn secrets_are_redacted_even_across_reads() {
        let secrets = [Secret::new("a", b"hunter2\n"), Secret::new("b", b"hunt")];
        let input = b"pw=hunter2; short=hunt; almost=hunte; end=hunter";
        for piece in 1..=input.len() {
            assert_eq!(
                String::from_utf8(redact_in_pieces(&secrets, input, piece)).unwrap(),
                "pw=[redacted]; short=[redacted]; almost=[redacted]e; end=[redacted]er",
                "pieces of {piece}"
            );
        }
        // No secrets: unchanged.
        assert_eq!(redact_in_pieces(&[], b"hunter2", 3), b"hunter2");
    }
}
