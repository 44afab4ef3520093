//! Image references: `HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`.
//!
//! The grammar is the usual one of container tools (distribution's
//! `reference` package), read by oci-spec's parser, with ociblk's rules on
//! top where it is stricter:
//! - The registry host is never implied: the first path component must be
//!   a host (it contains `.` or `:`, or is `localhost`), so that a relative
//!   directory path is never taken for an image on Docker Hub. oci-spec
//!   reads `os` or `build/os` as `docker.io/library/os`, `docker.io/build/os`.
//! - The host may be an IPv6 literal (`[::1]:5000`), which oci-spec's
//!   grammar lacks, its port is a number up to 65535 (oci-spec: any
//!   digits), and its labels are DNS labels (oci-spec takes `exa_mple.com`
//!   as a host, having read it as a repository component first).
//! - A digest is sha256 in lowercase hex, the only one ociblk uses
//!   (oci-spec: sha384 and sha512 too, uppercase hex too); a tag is ASCII
//!   (oci-spec's `\w` takes any Unicode letter); host and repository
//!   together are at most 255 characters (oci-spec counts the repository).
//! - The reference is kept as written: oci-spec puts `library/` before a
//!   Docker Hub repository of one component, names `index.docker.io`
//!   `docker.io`, and sets the tag `latest` when none is given. Here the
//!   host is ociblk's to read and oci-spec sees a stand-in in its place,
//!   and an implied tag stays unset ([`Reference::tag_or_default`]).
//!
//! A refusal names the part that is wrong, from ociblk's own reading of the
//! reference part by part (oci-spec's errors do not name the part).

use std::fmt;

use oci_spec::distribution::Reference as OciReference;

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
        Reference::read(s).map_err(|oci_spec_reason| Error::Reference {
            reference: s.to_string(),
            message: refusal(s).unwrap_or(oci_spec_reason),
        })
    }

    /// `s` read by oci-spec's parser, under ociblk's rules (see the
    /// module's description). [`refusal`] explains a refusal; the error
    /// here is oci-spec's reason, for one that `refusal` would not explain.
    fn read(s: &str) -> Result<Self, String> {
        // The host is in the name, before the digest (which may hold any
        // character until it is checked).
        let name = s.rsplit_once('@').map_or(s, |(name, _)| name);
        let (host, path_tag) = explicit_host(name)?;
        check_host(host)?;
        let read = OciReference::try_from(format!("{STAND_IN_HOST}/{}", &s[host.len() + 1..]))
            .map_err(|e| format!("{e} (oci-spec)"))?;
        let digest = read
            .digest()
            .map(str::parse::<Digest>)
            .transpose()
            .map_err(|e| e.to_string())?;
        // oci-spec sets `latest` when neither a tag nor a digest is
        // written; a `:` after the host is a tag's (a repository has none).
        let tag = read.tag().filter(|_| path_tag.contains(':'));
        if let Some(tag) = tag {
            check_tag(tag)?;
        }
        check_length(host, read.repository())?;
        Ok(Reference {
            host: host.to_string(),
            repository: read.repository().to_string(),
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

/// What oci-spec's parser sees in place of the host: a host it reads as
/// one, and to which it applies none of its Docker Hub rewriting.
const STAND_IN_HOST: &str = "localhost";

/// Why `s` is not a reference, naming the part that is wrong, from
/// ociblk's reading of it part by part: the digest, the host, the
/// repository, the tag, the length. `None` when every part is right.
fn refusal(s: &str) -> Option<String> {
    let (name_tag, digest) = match s.rsplit_once('@') {
        Some((rest, d)) => (rest, Some(d)),
        None => (s, None),
    };
    if let Some(Err(e)) = digest.map(str::parse::<Digest>) {
        return Some(e.to_string());
    }
    let check = || {
        let (host, path_tag) = explicit_host(name_tag)?;
        check_host(host)?;
        let (repository, tag) = match path_tag.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (path_tag, None),
        };
        check_repository(repository)?;
        if let Some(tag) = tag {
            check_tag(tag)?;
        }
        check_length(host, repository)
    };
    check().err()
}

/// The registry host `s` names and what follows it: the first path
/// component must be a host, never implied.
fn explicit_host(s: &str) -> Result<(&str, &str), String> {
    let (host, rest) = s.split_once('/').ok_or_else(|| {
        "no registry host: write HOST[:PORT]/REPO[:TAG], e.g. localhost:5000/os:1".to_string()
    })?;
    if !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err(format!(
            "{host:?} is not a registry host (a host contains '.' or ':', or is localhost)"
        ));
    }
    Ok((host, rest))
}

/// Host and repository together are a name of at most 255 characters.
fn check_length(host: &str, repository: &str) -> Result<(), String> {
    if host.len() + 1 + repository.len() > 255 {
        return Err("name longer than 255 characters".into());
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), String> {
    let (name, port) = if let Some(bracketed) = host.strip_prefix('[') {
        let (inner, rest) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("host {host:?}: unclosed '['"))?;
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("host {host:?}: not an IPv6 address"));
        }
        // Only a port may follow the address.
        let port = match rest {
            "" => None,
            _ => Some(rest.strip_prefix(':').ok_or_else(|| {
                format!("host {host:?}: only :PORT may follow the bracketed address")
            })?),
        };
        (None, port)
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

    /// What oci-spec's parser accepts and ociblk refuses, and why.
    #[test]
    fn stricter_than_oci_spec() {
        let sha512 = format!("localhost/os@sha512:{}", "f".repeat(128));
        let uppercase = format!("localhost/os@sha256:{}", "F".repeat(64));
        let long = format!("registry.example.com/{}", "a".repeat(240));
        for (text, why) in [
            // oci-spec: docker.io/library/os-image, docker.io/build/sample-image.
            ("os-image", "no registry host"),
            ("build/sample-image", "not a registry host"),
            ("localhost:99999/os", "port"),
            ("exa_mple.com/os", "not a DNS name"),
            ("localhost/os:v\u{e9}", "tag"),
            (&sha512, "not a sha256 digest"),
            (&uppercase, "lowercase hex"),
            (&long, "longer than 255"),
        ] {
            assert!(
                OciReference::try_from(text).is_ok(),
                "oci-spec takes {text}"
            );
            let err = Reference::parse(text).expect_err(text).to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    /// What ociblk accepts and oci-spec's parser refuses: an IPv6 host,
    /// which it never sees.
    #[test]
    fn ipv6_hosts_are_read_past_oci_spec() {
        let text = "[::1]:5000/os:t";
        OciReference::try_from(text).expect_err("no IPv6 literal in oci-spec's grammar");
        let r = Reference::parse(text).expect("valid");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("[::1]:5000", "os", Some("t"))
        );
        let r = Reference::parse("[::1]/os").expect("no port");
        assert_eq!(r.host, "[::1]");
        for bad in ["[::1]x/os", "[::1]5000/os", "[::1]:/os", "[::1]:x/os"] {
            let e = Reference::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("[::1]") || e.contains("port"), "{bad}: {e}");
        }
    }

    /// Where oci-spec rewrites a reference, ociblk keeps it as written.
    #[test]
    fn kept_as_written_where_oci_spec_rewrites_it() {
        for (text, registry, repository, tag) in [
            ("docker.io/alpine", "docker.io", "library/alpine", "latest"),
            ("index.docker.io/x/y:1", "docker.io", "x/y", "1"),
            ("localhost/os", "localhost", "os", "latest"),
        ] {
            let theirs = OciReference::try_from(text).expect(text);
            assert_eq!(
                (theirs.registry(), theirs.repository(), theirs.tag()),
                (registry, repository, Some(tag)),
                "{text}"
            );
            let ours = Reference::parse(text).expect(text);
            assert_eq!(ours.to_string(), text);
            assert_eq!(ours.tag_or_default(), tag);
        }
        let hub = Reference::parse("docker.io/alpine").expect("valid");
        assert_eq!((hub.repository.as_str(), hub.tag), ("alpine", None));
        let legacy = Reference::parse("index.docker.io/x/y:1").expect("valid");
        assert_eq!(legacy.host, "index.docker.io");
    }

    /// Where both accept a reference, they read it alike.
    #[test]
    fn read_as_oci_spec_reads_it() {
        for text in [
            "127.0.0.1:5000/monogon/os-image:v1.2",
            "registry.example.com/a/b_c/d__e/f---g.h:T_1.x-y",
            &format!("localhost:5000/os:t@{D}"),
            &format!("registry.example.com/os@{D}"),
        ] {
            let theirs = OciReference::try_from(text).expect(text);
            let ours = Reference::parse(text).expect(text);
            assert_eq!(ours.host, theirs.registry(), "{text}");
            assert_eq!(ours.repository, theirs.repository(), "{text}");
            assert_eq!(ours.tag.as_deref(), theirs.tag(), "{text}");
            let digest = ours.digest.map(|d| d.to_string());
            assert_eq!(digest.as_deref(), theirs.digest(), "{text}");
        }
    }

    /// ociblk's part-by-part reading refuses exactly what the reading
    /// through oci-spec refuses: every refusal names its part.
    #[test]
    fn every_refusal_names_its_part() {
        let long = format!("registry.example.com/{}", "a".repeat(240));
        let longest = format!("registry.example.com/{}", "a".repeat(234));
        for text in [
            "localhost/os",
            "localhost:5000/a/b:c",
            &format!("[::1]:5000/os:t@{D}"),
            &format!("localhost/os@{D}"),
            &longest,
            &long,
            "",
            "os",
            "localhost",
            "localhost/",
            "localhost/os:",
            "localhost/os@",
            "localhost/os:t:u",
            "localhost/a:5000/b",
            "localhost:/os",
            "localhost:5000:1/os",
            "a..b.example/os",
            "-a.example/os",
            "[::1/os",
            "[zz]:1/os",
            "localhost/os\n",
            "localhost/Os",
            "localhost/os/",
            "localhost/os:t@sha256:ab",
            &format!("localhost/os@x@{D}"),
            &format!("os@{D}"),
            &format!("localhost@{D}/os"),
            ":justtag",
            "test:5000/Uppercase/lowercase:tag",
            "aa/asdf$$^/aa",
            "localhost/os:v\u{e9}",
            "exa_mple.com/os",
        ] {
            assert_eq!(
                Reference::read(text).is_ok(),
                refusal(text).is_none(),
                "{text:?}"
            );
        }
    }
}
