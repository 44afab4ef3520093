//! Image references: `HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`.
//!
//! The grammar is the usual one of container tools (distribution's
//! `reference` package), except that the registry host is never implied: the
//! first path component must be a host (it contains `.` or `:`, or is
//! `localhost`), so that a relative directory path is never taken for an
//! image on Docker Hub.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The tag used when a reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host as written, with its port if any (`127.0.0.1:5000`).
    pub host: String,
    /// Repository path inside the registry (`monogon/os-image`).
    pub repository: String,
    /// Tag, if the reference names one.
    pub tag: Option<String>,
    /// Manifest digest, if the reference pins one; it wins over the tag.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parses `s`; the error says which part is wrong.
    pub fn parse(s: &str) -> Result<Self> {
        let fail = |message: String| Error::Reference {
            reference: s.to_string(),
            message,
        };
        let (name_tag, digest) = match s.rsplit_once('@') {
            Some((rest, d)) => (
                rest,
                Some(d.parse::<Digest>().map_err(|e| fail(e.to_string()))?),
            ),
            None => (s, None),
        };
        let (host, path_tag) = name_tag.split_once('/').ok_or_else(|| {
            fail("no registry host: write HOST[:PORT]/REPO[:TAG], e.g. localhost:5000/os:1".into())
        })?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(fail(format!(
                "{host:?} is not a registry host (a host contains '.' or ':', or is localhost)"
            )));
        }
        check_host(host).map_err(fail)?;
        let (repository, tag) = match path_tag.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (path_tag, None),
        };
        check_repository(repository).map_err(fail)?;
        if let Some(tag) = tag {
            check_tag(tag).map_err(fail)?;
        }
        if host.len() + 1 + repository.len() > 255 {
            return Err(fail("name longer than 255 characters".into()));
        }
        Ok(Reference {
            host: host.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The tag to resolve when no digest is pinned.
    pub fn tag_or_default(&self) -> &str {
        self.tag.as_deref().unwrap_or(DEFAULT_TAG)
    }

    /// Host and port to send API requests to (Docker Hub's API lives on a
    /// host of its own).
    pub fn api_host(&self) -> &str {
        if self.host == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.host
        }
    }

    /// The host without its port, for loopback and insecure-list checks.
    pub fn host_name(&self) -> &str {
        host_name(&self.host)
    }

    /// The same image pinned to `digest`.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// `host` without `:port` (an IPv6 literal keeps no brackets).
pub fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        let (inner, rest) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("host {host:?}: unclosed '['"))?;
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("host {host:?}: not an IPv6 address"));
        }
        (None, rest.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    if let Some(name) = name {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !name.split('.').all(label_ok) {
            return Err(format!("host {name:?}: not a DNS name or IPv4 address"));
        }
    }
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("port {port:?}: not a number from 0 to 65535"));
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("empty repository name".into());
    }
    for component in repo.split('/') {
        if !path_component_ok(component) {
            return Err(format!(
                "repository component {component:?}: lowercase letters and digits, \
                 separated by '.', '_', '__' or dashes"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`
fn path_component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?}: up to 128 letters, digits, '_', '.', '-', not starting with '.' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:87919b71dde8429fd2bf6fb8688e04d6103f11343aa527595c0e79f4f211dca3";

    #[test]
    fn host_port_repo_tag() {
        let r = Reference::parse("127.0.0.1:5000/monogon/os-image:v1.2").expect("valid");
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.host_name(), "127.0.0.1");
        assert_eq!(r.repository, "monogon/os-image");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(r.digest, None);
        assert_eq!(r.to_string(), "127.0.0.1:5000/monogon/os-image:v1.2");
    }

    #[test]
    fn default_tag_and_digest() {
        let r = Reference::parse("localhost/os").expect("valid");
        assert_eq!(r.tag_or_default(), "latest");
        let r = Reference::parse(&format!("registry.example.com/os@{D}")).expect("valid");
        assert_eq!(r.digest.map(|d| d.to_string()).as_deref(), Some(D));
        assert_eq!(r.tag, None);
        let r = Reference::parse(&format!("[::1]:5000/os:t@{D}")).expect("valid");
        assert_eq!(r.host_name(), "::1");
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(
            Reference::parse("docker.io/library/x")
                .expect("valid")
                .api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn rejects_with_reason() {
        for (bad, why) in [
            ("build/sample-image", "not a registry host"),
            ("os-image", "no registry host"),
            ("localhost:5000/Os", "repository component"),
            ("localhost:5000/os//x", "repository component"),
            ("localhost:5000/os:.bad", "tag"),
            ("localhost:99999/os", "port"),
            ("localhost:5000/os@sha256:abc", "not a sha256 digest"),
            ("exa_mple.com/os", "not a DNS name"),
        ] {
            let err = Reference::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn separators() {
        for ok in ["a", "a.b", "a_b", "a__b", "a---b", "a1/b2/c-3"] {
            assert!(check_repository(ok).is_ok(), "{ok}");
        }
        for bad in ["a..b", "a___b", "_a", "a-", "a.-b"] {
            assert!(check_repository(bad).is_err(), "{bad}");
        }
    }
}
