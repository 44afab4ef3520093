//! Mirrors, pull-through caches, blocked and insecure registries, as
//! containers-registries.conf(5) (version 2) describes them.
//!
//! Read like skopeo and podman read them: `/etc/containers/registries.conf`
//! and then `/etc/containers/registries.conf.d/*.conf` in name order (for a
//! user other than root `~/.config/containers/registries.conf` instead of
//! the system file when it exists, and `~/.config/containers/registries.conf.d`
//! after the system drop-ins). A `[[registry]]` in a later file replaces one
//! with the same prefix in an earlier file. `--registries-conf FILE` reads
//! FILE alone.
//!
//! What ociblk takes from them: `[[registry]]` `prefix`, `location`,
//! `insecure`, `blocked`, `mirror-by-digest-only`, and each
//! `[[registry.mirror]]` `location`, `insecure`, `pull-from-mirror`; and
//! version 1's `[registries.insecure]` and `[registries.block]` lists.
//! Other keys (search registries, short-name aliases) are left alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::reference::Reference;

/// The system file.
pub const SYSTEM_FILE: &str = "/etc/containers/registries.conf";
/// The system drop-in directory.
pub const SYSTEM_DIR: &str = "/etc/containers/registries.conf.d";

/// Which registries.conf files are read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConfSource {
    /// The system's files and drop-ins (and the user's, not as root).
    #[default]
    System,
    /// This file alone (`--registries-conf`).
    File(PathBuf),
    /// None: every image comes from the registry its reference names.
    Nothing,
}

/// Which references a mirror serves (`pull-from-mirror`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullFrom {
    All,
    DigestOnly,
    TagOnly,
}

/// A `[[registry.mirror]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port][/path]`
    pub location: String,
    pub insecure: bool,
    pub pull_from: PullFrom,
}

/// A `[[registry]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryEntry {
    /// `host[:port][/path]`, or `*.domain`.
    pub prefix: String,
    /// Where images under `prefix` are (`prefix` when not given).
    pub location: String,
    pub insecure: bool,
    pub blocked: bool,
    pub mirrors: Vec<Mirror>,
    /// The file it came from, for messages.
    pub file: PathBuf,
}

/// Every `[[registry]]` read, by prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistriesConf {
    pub registries: BTreeMap<String, RegistryEntry>,
}

/// One place an image may be fetched from: a mirror or the registry itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The image's reference at this place.
    pub reference: Reference,
    /// Plain HTTP is allowed to it (`insecure = true`).
    pub insecure: bool,
    pub mirror: bool,
    /// Whether a tag may be resolved here; any endpoint may serve content
    /// by digest, which is verified whoever serves it.
    pub tags: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct FileV2 {
    #[serde(default)]
    registry: Vec<RawRegistry>,
    #[serde(default)]
    registries: Option<RawV1>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawRegistry {
    prefix: Option<String>,
    location: Option<String>,
    insecure: Option<bool>,
    blocked: Option<bool>,
    mirror_by_digest_only: Option<bool>,
    #[serde(default)]
    mirror: Vec<RawMirror>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawMirror {
    location: Option<String>,
    insecure: Option<bool>,
    pull_from_mirror: Option<String>,
}

#[derive(Deserialize)]
struct RawV1 {
    #[serde(default)]
    insecure: Option<RawV1List>,
    #[serde(default)]
    block: Option<RawV1List>,
}

#[derive(Deserialize)]
struct RawV1List {
    #[serde(default)]
    registries: Vec<String>,
}

impl RegistriesConf {
    /// Reads the files `source` names; a file that does not exist is
    /// empty, a file that cannot be parsed is an error naming it.
    pub fn load(source: &ConfSource) -> Result<RegistriesConf> {
        let mut conf = RegistriesConf::default();
        let files = match source {
            ConfSource::Nothing => return Ok(conf),
            ConfSource::File(file) => {
                let text = std::fs::read(file).map_err(|e| Error::io(file, e))?;
                conf.merge(file, &text)?;
                return Ok(conf);
            }
            ConfSource::System => system_files()?,
        };
        for file in files {
            match std::fs::read(&file) {
                Ok(text) => conf.merge(&file, &text)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&file, e)),
            }
        }
        Ok(conf)
    }

    /// Adds the registries of `text`, the contents of `file`: an entry
    /// replaces an earlier one with the same prefix.
    pub fn merge(&mut self, file: &Path, text: &[u8]) -> Result<()> {
        for entry in parse(file, text)? {
            self.registries.insert(entry.prefix.clone(), entry);
        }
        Ok(())
    }

    /// The entry whose prefix matches `reference` best (the longest), if any.
    pub fn entry_for(&self, reference: &Reference) -> Option<&RegistryEntry> {
        let name = format!("{}/{}", reference.host, reference.repository);
        self.registries
            .values()
            .filter(|e| prefix_matches(&e.prefix, &reference.host, &name))
            .max_by_key(|e| {
                // A wildcard is less specific than any name it covers.
                if e.prefix.starts_with("*.") {
                    e.prefix.len().saturating_sub(1)
                } else {
                    e.prefix.len() + 1
                }
            })
    }

    /// Where to fetch `reference` from, in order: its mirrors, then the
    /// registry itself (last, always). Refuses a blocked registry.
    pub fn endpoints(&self, reference: &Reference) -> Result<Vec<Endpoint>> {
        let Some(entry) = self.entry_for(reference) else {
            return Ok(vec![Endpoint {
                reference: reference.clone(),
                insecure: false,
                mirror: false,
                tags: true,
            }]);
        };
        // An error about `field` of the entry, named in the file it came from.
        let entry_error = |field: &str, message: String| {
            invalid(
                &entry.file,
                format!("registry {:?}: {field}", entry.prefix),
                message,
            )
        };
        if entry.blocked {
            return Err(entry_error(
                "blocked",
                format!("pulling {reference} is blocked"),
            ));
        }
        // `reference` at `location` (the entry's `field`).
        let at = |location: &str, field: &str| {
            rewrite(reference, &entry.prefix, location).map_err(|m| entry_error(field, m))
        };
        let mut out = Vec::new();
        for (i, mirror) in entry.mirrors.iter().enumerate() {
            out.push(Endpoint {
                reference: at(&mirror.location, &format!("mirror[{i}].location"))?,
                insecure: mirror.insecure,
                mirror: true,
                tags: mirror.pull_from != PullFrom::DigestOnly,
            });
        }
        out.push(Endpoint {
            reference: at(&entry.location, "location")?,
            insecure: entry.insecure,
            mirror: false,
            tags: true,
        });
        Ok(out)
    }
}

/// The files read for [`ConfSource::System`], in order.
fn system_files() -> Result<Vec<PathBuf>> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let home = std::env::var_os("HOME")
        .filter(|_| !root)
        .map(|h| PathBuf::from(h).join(".config/containers"));
    let mut files = Vec::new();
    let user_file = home.as_ref().map(|h| h.join("registries.conf"));
    match &user_file {
        // A user's own file replaces the system's, drop-ins and all.
        Some(file) if file.is_file() => files.push(file.clone()),
        _ => {
            files.push(PathBuf::from(SYSTEM_FILE));
            files.extend(drop_ins(Path::new(SYSTEM_DIR))?);
        }
    }
    if let Some(home) = &home {
        files.extend(drop_ins(&home.join("registries.conf.d"))?);
    }
    Ok(files)
}

/// The `*.conf` files of `dir`, by name.
fn drop_ins(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io(dir, e))?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    files.sort();
    Ok(files)
}

/// The registries `text` (the contents of `file`) describes.
pub fn parse(file: &Path, text: &[u8]) -> Result<Vec<RegistryEntry>> {
    let raw = read_toml(file, text)?;
    if let Some(v1) = raw.registries {
        if !raw.registry.is_empty() {
            return Err(invalid(
                file,
                "registries".into(),
                "version 1 [registries.*] tables and version 2 [[registry]] in one file".into(),
            ));
        }
        return version_1_entries(file, v1);
    }
    let mut out: Vec<RegistryEntry> = Vec::new();
    for (i, r) in raw.registry.into_iter().enumerate() {
        let entry = registry_entry(file, i, r)?;
        if out.iter().any(|e| e.prefix == entry.prefix) {
            return Err(invalid(
                file,
                format!("registry[{i}].prefix"),
                format!("{:?} is defined twice in this file", entry.prefix),
            ));
        }
        out.push(entry);
    }
    Ok(out)
}

/// The error for `field` of `file`.
fn invalid(file: &Path, field: String, message: String) -> Error {
    Error::Invalid {
        what: file.display().to_string(),
        field,
        message,
    }
}

/// `text`, the contents of `file`, as TOML; an error names the line.
fn read_toml(file: &Path, text: &[u8]) -> Result<FileV2> {
    let text = std::str::from_utf8(text)
        .map_err(|e| invalid(file, "(document)".into(), format!("not UTF-8: {e}")))?;
    toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .and_then(|s| text.get(..s.start))
            .map(|before| before.matches('\n').count() + 1);
        let message = e.message().trim_end().to_string();
        invalid(
            file,
            "(document)".into(),
            match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            },
        )
    })
}

/// The entries of version 1's `[registries.insecure]` and
/// `[registries.block]` lists: a host in both is one entry.
fn version_1_entries(file: &Path, v1: RawV1) -> Result<Vec<RegistryEntry>> {
    let mut out: Vec<RegistryEntry> = Vec::new();
    let mut add = |list: Option<RawV1List>, field: &str, insecure: bool, blocked: bool| {
        for (i, host) in list
            .map(|l| l.registries)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            check_location(&host)
                .map_err(|m| invalid(file, format!("registries.{field}.registries[{i}]"), m))?;
            match out.iter_mut().find(|e| e.prefix == host) {
                Some(e) => {
                    e.insecure |= insecure;
                    e.blocked |= blocked;
                }
                None => out.push(RegistryEntry {
                    prefix: host.clone(),
                    location: host,
                    insecure,
                    blocked,
                    mirrors: Vec::new(),
                    file: file.to_path_buf(),
                }),
            }
        }
        Ok::<(), Error>(())
    };
    add(v1.insecure, "insecure", true, false)?;
    add(v1.block, "block", false, true)?;
    Ok(out)
}

/// `[[registry]]` number `i` of `file`, checked.
fn registry_entry(file: &Path, i: usize, r: RawRegistry) -> Result<RegistryEntry> {
    let field = |name: &str| format!("registry[{i}].{name}");
    let location = r.location.unwrap_or_default();
    let prefix = match r.prefix {
        Some(p) if !p.is_empty() => p,
        _ => location.clone(),
    };
    if prefix.is_empty() {
        return Err(invalid(
            file,
            field("location"),
            "neither prefix nor location given".into(),
        ));
    }
    let wildcard = prefix.starts_with("*.");
    if wildcard {
        check_wildcard(&prefix).map_err(|m| invalid(file, field("prefix"), m))?;
        if !location.is_empty() {
            return Err(invalid(
                file,
                field("location"),
                format!("not allowed with the wildcard prefix {prefix:?}"),
            ));
        }
    } else {
        if !location.is_empty() {
            check_location(&location).map_err(|m| invalid(file, field("location"), m))?;
        }
        check_location(&prefix).map_err(|m| invalid(file, field("prefix"), m))?;
    }
    let digest_only = r.mirror_by_digest_only.unwrap_or(false);
    let mirrors = r
        .mirror
        .into_iter()
        .enumerate()
        .map(|(j, m)| mirror(file, i, j, m, digest_only))
        .collect::<Result<Vec<_>>>()?;
    if wildcard && !mirrors.is_empty() {
        // A mirror's location replaces the prefix; a wildcard names no
        // one path to put in its place.
        return Err(invalid(
            file,
            field("mirror"),
            format!("mirrors of the wildcard prefix {prefix:?} cannot be placed"),
        ));
    }
    Ok(RegistryEntry {
        location: if location.is_empty() {
            prefix.clone()
        } else {
            location
        },
        prefix,
        insecure: r.insecure.unwrap_or(false),
        blocked: r.blocked.unwrap_or(false),
        mirrors,
        file: file.to_path_buf(),
    })
}

/// `[[registry.mirror]]` number `j` of `[[registry]]` number `i`, checked;
/// `digest_only` is the registry's `mirror-by-digest-only`.
fn mirror(file: &Path, i: usize, j: usize, m: RawMirror, digest_only: bool) -> Result<Mirror> {
    let field = |name: &str| format!("registry[{i}].mirror[{j}].{name}");
    let location = m.location.unwrap_or_default();
    check_location(&location).map_err(|e| invalid(file, field("location"), e))?;
    let pull_from = match m.pull_from_mirror.as_deref() {
        None | Some("") | Some("all") => PullFrom::All,
        Some("digest-only") => PullFrom::DigestOnly,
        Some("tag-only") => PullFrom::TagOnly,
        Some(other) => {
            return Err(invalid(
                file,
                field("pull-from-mirror"),
                format!("{other:?} is none of all, digest-only, tag-only"),
            ));
        }
    };
    if digest_only && pull_from != PullFrom::All {
        return Err(invalid(
            file,
            field("pull-from-mirror"),
            "set together with the registry's mirror-by-digest-only".into(),
        ));
    }
    Ok(Mirror {
        location,
        insecure: m.insecure.unwrap_or(false),
        pull_from: if digest_only {
            PullFrom::DigestOnly
        } else {
            pull_from
        },
    })
}

/// A location is `host[:port][/path]`, without a scheme: it must read as
/// the name part of a reference.
fn check_location(location: &str) -> std::result::Result<(), String> {
    if location.is_empty() {
        return Err("empty".into());
    }
    if location.contains("://") {
        return Err(format!(
            "{location:?}: write host[:port][/path], without a scheme"
        ));
    }
    let (host, path) = location.split_once('/').unwrap_or((location, ""));
    let probe = if path.is_empty() {
        format!("{host}/x")
    } else {
        format!("{host}/{path}")
    };
    let probe = if host.contains('.') || host.contains(':') || host == "localhost" {
        probe
    } else {
        // A single-label host is fine in registries.conf; test the rest.
        format!("{host}.local{}", &probe[host.len()..])
    };
    Reference::parse(&probe).map(|_| ()).map_err(|e| match e {
        Error::Reference { message, .. } => format!("{location:?}: {message}"),
        other => other.to_string(),
    })
}

/// A wildcard prefix is `*.` followed by a host name.
fn check_wildcard(prefix: &str) -> std::result::Result<(), String> {
    let rest = &prefix[2..];
    if rest.is_empty()
        || rest.contains(['*', '/', ':'])
        || !rest
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(format!("{prefix:?}: a wildcard is *.DOMAIN"));
    }
    Ok(())
}

/// Whether `prefix` covers the image `name` (`host/repository`) on `host`.
fn prefix_matches(prefix: &str, host: &str, name: &str) -> bool {
    if let Some(domain) = prefix.strip_prefix("*.") {
        let bare = crate::reference::host_name(host);
        return bare
            .strip_suffix(domain)
            .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1);
    }
    name == prefix
        || name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `reference` with `prefix` replaced by `location`.
fn rewrite(
    reference: &Reference,
    prefix: &str,
    location: &str,
) -> std::result::Result<Reference, String> {
    if prefix.starts_with("*.") {
        return Ok(reference.clone());
    }
    let name = format!("{}/{}", reference.host, reference.repository);
    let rest = name.strip_prefix(prefix).unwrap_or("");
    let new_name = format!("{location}{rest}");
    let mut text = new_name.clone();
    if let Some(tag) = &reference.tag {
        text.push(':');
        text.push_str(tag);
    }
    if let Some(digest) = &reference.digest {
        text.push('@');
        text.push_str(&digest.to_string());
    }
    Reference::parse(&text).map_err(|e| match e {
        Error::Reference { message, .. } => {
            format!("{reference} there would be {new_name:?}: {message}")
        }
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> RegistriesConf {
        let mut c = RegistriesConf::default();
        c.merge(Path::new("/etc/r.conf"), text.as_bytes())
            .expect("valid registries.conf");
        c
    }

    fn r(s: &str) -> Reference {
        Reference::parse(s).expect("reference")
    }

    #[test]
    fn mirrors_first_then_the_registry_at_its_location() {
        let c = conf(
            r#"
unqualified-search-registries = ["docker.io"]
[[registry]]
prefix = "reg.example/os"
location = "internal.example:5000/mirror/os"
insecure = true
[[registry.mirror]]
location = "m1.example/cache"
[[registry.mirror]]
location = "m2.example"
pull-from-mirror = "digest-only"
insecure = true
[[registry]]
location = "reg.example"
blocked = true
[aliases]
"x" = "y.example/x"
"#,
        );
        let e = c
            .endpoints(&r("reg.example/os/node:v1"))
            .expect("endpoints");
        let names: Vec<String> = e.iter().map(|e| e.reference.to_string()).collect();
        assert_eq!(
            names,
            [
                "m1.example/cache/node:v1",
                "m2.example/node:v1",
                "internal.example:5000/mirror/os/node:v1"
            ]
        );
        assert_eq!(
            e.iter()
                .map(|e| (e.tags, e.insecure, e.mirror))
                .collect::<Vec<_>>(),
            [
                (true, false, true),
                (false, true, true),
                (true, true, false)
            ]
        );
        // Longest prefix wins; "reg.example/osx" is not under "reg.example/os".
        let err = c.endpoints(&r("reg.example/osx:1")).expect_err("blocked");
        assert!(err.to_string().contains("/etc/r.conf") && err.to_string().contains("blocked"));
        let plain = c.endpoints(&r("other.example/a")).expect("no entry");
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].reference, r("other.example/a"));
    }

    #[test]
    fn wildcards_drop_ins_and_version_1() {
        let mut c = conf("[[registry]]\nprefix = \"*.corp.example\"\ninsecure = true\n");
        c.merge(
            Path::new("/etc/d/2.conf"),
            b"[[registry]]\nprefix = \"*.corp.example\"\nblocked = true\n",
        )
        .expect("drop-in");
        assert!(c.entry_for(&r("a.corp.example/x")).expect("match").blocked);
        assert!(c.entry_for(&r("corp.example/x")).is_none());
        let v1 = conf(
            "[registries.search]\nregistries = []\n[registries.insecure]\nregistries = [\"lab.example:5000\"]\n",
        );
        let e = v1.endpoints(&r("lab.example:5000/os")).expect("endpoints");
        assert!(e[0].insecure);
    }

    #[test]
    fn bad_entries_name_file_and_field() {
        for (text, field) in [
            (
                "[[registry]]\nlocation = \"https://r.example\"\n",
                "registry[0].location",
            ),
            (
                "[[registry]]\nprefix = \"r.example\"\n[[registry.mirror]]\nlocation = \"m\"\npull-from-mirror = \"sometimes\"\n",
                "registry[0].mirror[0].pull-from-mirror",
            ),
            ("[[registry]]\ninsecure = true\n", "registry[0].location"),
            (
                "[[registry]]\nprefix = \"*.a\"\nlocation = \"b.example\"\n",
                "registry[0].location",
            ),
            (
                "[[registry]]\nprefix = \"x.example\"\n[[registry]]\nprefix = \"x.example\"\n",
                "registry[1].prefix",
            ),
            ("[[registry]]\nprefix = 3\n", "(document)"),
            (
                "[registries.insecure]\nregistries = [\"a.example\"]\n[[registry]]\nprefix = \"b.example\"\n",
                "registries",
            ),
        ] {
            let err = parse(Path::new("/etc/r.conf"), text.as_bytes())
                .expect_err(text)
                .to_string();
            assert!(
                err.starts_with(&format!("/etc/r.conf: field {field}:")),
                "{text}: {err}"
            );
        }
    }
}
