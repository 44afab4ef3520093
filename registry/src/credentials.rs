//! Registry credentials from the files container tools write: the `auths`
//! entries of `$REGISTRY_AUTH_FILE`, else `$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::error::{Error, Result};

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

/// The auth file to read: `$REGISTRY_AUTH_FILE`, else `$DOCKER_CONFIG/config.json`,
/// else `~/.docker/config.json`; `None` when no candidate is known.
pub fn default_auth_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        return Some(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// The credentials stored in `file` for registry `host` (as in a reference,
/// with its port); `Ok(None)` when the file does not exist or has no entry.
pub fn lookup(file: &Path, host: &str) -> Result<Option<Credentials>> {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(file, e)),
    };
    parse_auth_file(file, &text, host)
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
