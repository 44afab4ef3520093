//! Registry credentials where container tools keep them, read the way
//! podman, skopeo and docker read them.
//!
//! The files, in order (the first that has credentials for the registry
//! wins): `$REGISTRY_AUTH_FILE` (else `$XDG_RUNTIME_DIR/containers/auth.json`),
//! `~/.config/containers/auth.json`, `$DOCKER_CONFIG/config.json` (else
//! `~/.docker/config.json`). An auth file given explicitly is read alone.
//!
//! In each file: the registry's `credHelpers` entry, else its `auths`
//! entry, else the `credsStore` default. A helper is the program
//! `docker-credential-NAME`, run as `docker-credential-NAME get` with the
//! registry on stdin, answering `{"Username": .., "Secret": ..}` on stdout
//! within [`HELPER_TIMEOUT`].

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};

/// The longest a credential helper may take to answer.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a credential helper's answer may hold.
const HELPER_OUTPUT_LIMIT: u64 = 1 << 20;

/// A user name and password (or token) for HTTP Basic and token requests.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log.
        write!(f, "Credentials {{ username: {:?}, .. }}", self.username)
    }
}

impl Credentials {
    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
}

/// The helpers part of an auth file.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HelperConfig {
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

/// The auth files read, in order, when none is given: `$REGISTRY_AUTH_FILE`
/// (else `$XDG_RUNTIME_DIR/containers/auth.json`),
/// `~/.config/containers/auth.json`, and `$DOCKER_CONFIG/config.json` (else
/// `~/.docker/config.json`).
pub fn default_auth_files() -> Vec<PathBuf> {
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let home = env("HOME").map(PathBuf::from);
    let mut files = Vec::new();
    if let Some(p) = env("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(p));
    } else if let Some(dir) = env("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(dir).join("containers/auth.json"));
    }
    if let Some(home) = &home {
        files.push(home.join(".config/containers/auth.json"));
    }
    if let Some(dir) = env("DOCKER_CONFIG") {
        files.push(PathBuf::from(dir).join("config.json"));
    } else if let Some(home) = &home {
        files.push(home.join(".docker/config.json"));
    }
    files
}

/// The credentials for registry `host` from the first of `files` that has
/// some (see the module's description); `Ok(None)` when none has.
pub fn lookup_in(files: &[PathBuf], host: &str) -> Result<Option<Credentials>> {
    for file in files {
        if let Some(found) = lookup(file, host)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The credentials `file` gives registry `host` (as in a reference, with
/// its port): through its `credHelpers` entry for the host, its `auths`
/// entry, or its `credsStore`, in that order; `Ok(None)` when the file
/// does not exist or gives none.
pub fn lookup(file: &Path, host: &str) -> Result<Option<Credentials>> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(file, e)),
    };
    // Checks the document is JSON (named as the auths field, as ever).
    let in_auths = parse_auth_file(file, &text, host)?;
    let helpers: HelperConfig = serde_json::from_slice(&text).map_err(|e| Error::Invalid {
        what: file.display().to_string(),
        field: "credHelpers".into(),
        message: e.to_string(),
    })?;
    if let Some((key, name)) = helpers
        .cred_helpers
        .iter()
        .find(|(k, _)| key_matches(k, host))
    {
        let found = run_helper(file, &format!("credHelpers.{key}"), name, host)?;
        if found.is_some() {
            return Ok(found);
        }
    }
    if in_auths.is_some() {
        return Ok(in_auths);
    }
    match &helpers.creds_store {
        Some(name) if !name.is_empty() => run_helper(file, "credsStore", name, host),
        _ => Ok(None),
    }
}

/// What a credential helper prints.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Runs `docker-credential-NAME get` for registry `host`, the helper named
/// by `field` of `file`; `Ok(None)` when it has no credentials for the host.
fn run_helper(file: &Path, field: &str, name: &str, host: &str) -> Result<Option<Credentials>> {
    let program = format!("docker-credential-{name}");
    let fail = |message: String| Error::CredentialHelper {
        program: program.clone(),
        file: file.to_path_buf(),
        field: field.to_string(),
        message,
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(fail(
            "a helper name is letters, digits, '-', '_' and '.'".into(),
        ));
    }
    // Docker Hub's credentials are stored under its old index URL.
    let server = if host == "docker.io" {
        "https://index.docker.io/v1/"
    } else {
        host
    };
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading its input is judged by its
        // exit status and output below.
        let _ = stdin.write_all(server.as_bytes());
    }
    type Pipe = Box<dyn std::io::Read + Send>;
    let read = |pipe: Option<Pipe>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(HELPER_OUTPUT_LIMIT).read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as Pipe));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as Pipe));
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                // Ends the helper this call started, by its PID.
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "no answer within {}s",
                    HELPER_TIMEOUT.as_secs()
                )));
            }
            Err(e) => return Err(fail(format!("waiting for it: {e}"))),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        let said = String::from_utf8_lossy(if stdout.is_empty() { &stderr } else { &stdout });
        if said.contains("credentials not found") {
            return Ok(None);
        }
        let said: String = said.trim().chars().take(200).collect();
        return Err(fail(format!("{status}: {said}")));
    }
    let answer: HelperAnswer = serde_json::from_slice(&stdout).map_err(|e| {
        fail(format!(
            "its answer is not {{\"Username\", \"Secret\"}} JSON: {e}"
        ))
    })?;
    if answer.username == "<token>" {
        return Err(fail(
            "it holds an identity token (docker login with OAuth), which ociblk does not use"
                .into(),
        ));
    }
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

/// The credentials for registry `host` in `text`, the contents of the
/// auth file `file` (named in errors).
pub fn parse_auth_file(file: &Path, text: &[u8], host: &str) -> Result<Option<Credentials>> {
    let what = file.display().to_string();
    let parsed: AuthFile = serde_json::from_slice(text).map_err(|e| Error::Invalid {
        what: what.clone(),
        field: "auths".into(),
        message: e.to_string(),
    })?;
    let Some((key, entry)) = parsed.auths.iter().find(|(key, _)| key_matches(key, host)) else {
        return Ok(None);
    };
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    let invalid = |message: String| Error::Invalid {
        what: what.clone(),
        field: format!("auths.{key}.auth"),
        message,
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|e| invalid(format!("not base64: {e}")))?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid("not UTF-8".into()))?;
    let (username, password) = decoded
        .split_once(':')
        .ok_or_else(|| invalid("not user:password".into()))?;
    Ok(Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    }))
}

/// Whether an `auths` key (a host, or a URL such as
/// `https://index.docker.io/v1/`) names `host`.
fn key_matches(key: &str, host: &str) -> bool {
    let bare = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let bare = bare.split('/').next().unwrap_or(bare);
    bare == host || (host == "docker.io" && bare == "index.docker.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_entry_by_host_or_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("auth.json");
        // "alice:s3cr:et" and "bob:pw"
        std::fs::write(
            &file,
            br#"{"auths":{"registry.example.com:5000":{"auth":"YWxpY2U6czNjcjpldA=="},
                "https://index.docker.io/v1/":{"auth":"Ym9iOnB3"}}}"#,
        )
        .expect("write");
        let c = lookup(&file, "registry.example.com:5000")
            .expect("read")
            .expect("entry");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cr:et")
        );
        let c = lookup(&file, "docker.io").expect("read").expect("entry");
        assert_eq!(c.username, "bob");
        assert_eq!(lookup(&file, "other.example.com").expect("read"), None);
        assert_eq!(
            lookup(&dir.path().join("none"), "x").expect("absent file"),
            None
        );
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn bad_entry_names_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("auth.json");
        std::fs::write(&file, br#"{"auths":{"h.example":{"auth":"!!"}}}"#).expect("write");
        let err = lookup(&file, "h.example")
            .expect_err("bad base64")
            .to_string();
        assert!(err.contains("auths.h.example.auth"), "{err}");
    }
}
