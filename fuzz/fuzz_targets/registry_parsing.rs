//! What a registry, a user or an auth file hands the registry client, parsed
//! as the registry path parses it.
//!
//! Input: one selector byte, then the text (invalid UTF-8 is replaced):
//!
//! - `R` an image reference: a parsed reference prints back to exactly the
//!   input, which parses to the same value; its host and repository give
//!   only safe cache path components; an error quotes the input.
//! - `C` a `WWW-Authenticate` challenge: a parsed challenge, written back
//!   in RFC 7235 form (quoted values, escapes), parses to the same value.
//! - `A` an auth file: the first line is the registry host, the rest the
//!   JSON. Credentials found are `user:password` without a `:` in the user,
//!   an auth file written for them gives them back, their `Debug` hides the
//!   password; an error names the file.
//! - `M` a manifest: accepted only with `schemaVersion` 2, the OCI manifest
//!   media type if any, and descriptors that agree with an independent read
//!   of the JSON; an error names the manifest's digest and a field.
//! - `D` a digest (as in a tag record): parsed digests print back to the
//!   input; `verify` agrees with the digest of the bytes.
//! - `P` an access record (`serve --record-access`, `--prefetch`; the raw
//!   bytes): an accepted record lists each chunk once, with line numbers
//!   that point at its line, and written back it parses to the same
//!   manifest and chunks; a refusal names a line within the input.
//! - `L` a redirect's `Location` from a loopback registry: a target that is
//!   followed is an absolute URL without credentials, HTTPS or plain HTTP
//!   to a loopback host only.
//! - `T` a tag record in the cache (the raw bytes): read back only when it
//!   is a digest (surrounding white space allowed), and `cache info` lists
//!   the tag exactly then.
//! - `H` an image config, for the chunk-hash tables that key a manifest's
//!   two layers (one blob listed twice) in the cache: tables only for the
//!   listed blob, the same on every read; a refusal names `layers[1]`.
//! - `G` a registries.conf: an accepted file gives entries with a prefix
//!   and a location, mirrors with locations, each prefix once; the image
//!   `PREFIX/fuzz:1` of each (non-wildcard) entry is matched by it and is
//!   fetched from its mirrors in order and then from the registry itself,
//!   keeping its tag, or refused naming the file; a refusal names the file
//!   and a field.
//!
//! Other selector bytes pick one of these by value.

#![no_main]

use std::path::Path;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use ociblk_registry::challenge::Challenge;
use ociblk_registry::client::{is_loopback, redirect_target};
use ociblk_registry::credentials::parse_auth_file;
use ociblk_registry::digest::Verify as _;
use ociblk_registry::image::{OCI_MANIFEST, chunk_tables};
use ociblk_registry::mirrors::{RegistriesConf, parse as parse_registries_conf};
use ociblk_registry::reference::host_name;
use ociblk_registry::{AccessRecord, Cache, Digest, Manifest, Reference};

fn check_reference(s: &str) {
    match Reference::parse(s) {
        Ok(r) => {
            let printed = r.to_string();
            assert_eq!(printed, s, "reference prints differently");
            let again = Reference::parse(&printed)
                .unwrap_or_else(|e| panic!("printed reference {printed:?} does not parse: {e}"));
            assert_eq!(again, r);
            // The cache keeps tag records under tags/HOST/REPOSITORY/:TAG.
            assert!(
                !r.host.is_empty() && !r.host.contains('/'),
                "host {:?}",
                r.host
            );
            assert!(
                !matches!(r.host.as_str(), "." | ".."),
                "host {:?} is a path step",
                r.host
            );
            for c in r.repository.split('/') {
                assert!(
                    !c.is_empty() && c != "." && c != "..",
                    "repository component {c:?}"
                );
            }
            assert!(!r.host_name().is_empty(), "empty host name in {s:?}");
            assert!(!r.tag_or_default().contains('/'));
            let pinned = r.with_digest(Digest::of(s.as_bytes()));
            assert_eq!(Reference::parse(&pinned.to_string()).ok(), Some(pinned));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{s:?}")),
                "error does not quote the input: {msg}"
            );
        }
    }
}

/// `c` as an RFC 7235 header value, every parameter value quoted.
fn write_challenge(c: &Challenge) -> String {
    let params: Vec<String> = c
        .params
        .iter()
        .map(|(name, value)| {
            let escaped: String = value
                .chars()
                .flat_map(|ch| match ch {
                    '"' | '\\' => vec!['\\', ch],
                    ch => vec![ch],
                })
                .collect();
            format!("{name}=\"{escaped}\"")
        })
        .collect();
    if params.is_empty() {
        c.scheme.clone()
    } else {
        format!("{} {}", c.scheme, params.join(", "))
    }
}

fn check_challenge(s: &str) {
    let Some(c) = Challenge::parse(s) else {
        return;
    };
    assert!(c.is(&c.scheme.to_ascii_uppercase()));
    for (name, value) in &c.params {
        assert_eq!(
            *name,
            name.to_ascii_lowercase(),
            "parameter name not lowercased"
        );
        assert_eq!(c.param(name), Some(value.as_str()));
    }
    let written = write_challenge(&c);
    let again = Challenge::parse(&written)
        .unwrap_or_else(|| panic!("written challenge {written:?} does not parse"));
    assert_eq!(again, c, "written as {written:?}");
}

fn check_auth_file(s: &str) {
    let (host, json) = s.split_once('\n').unwrap_or((s, ""));
    let file = Path::new("/fuzz/auth.json");
    match parse_auth_file(file, json.as_bytes(), host) {
        Ok(None) => {}
        Ok(Some(c)) => {
            assert!(
                !c.username.contains(':'),
                "user name {:?} holds ':'",
                c.username
            );
            assert_eq!(
                format!("{c:?}"),
                format!("Credentials {{ username: {:?}, .. }}", c.username)
            );
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.username, c.password));
            assert_eq!(c.basic_header(), format!("Basic {encoded}"));
            let written = serde_json::json!({ "auths": { host: { "auth": encoded } } });
            let again = parse_auth_file(file, written.to_string().as_bytes(), host)
                .unwrap_or_else(|e| panic!("written auth file refused: {e}"));
            assert_eq!(again.as_ref(), Some(&c));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/fuzz/auth.json"),
                "error does not name the file: {msg}"
            );
            assert!(
                msg.contains("field auths"),
                "error does not name the field: {msg}"
            );
        }
    }
}

/// The descriptor at `v` as (digest, size, media type), read independently.
fn descriptor(v: &serde_json::Value) -> Option<(String, u64, String)> {
    Some((
        v.get("digest")?.as_str()?.to_string(),
        v.get("size")?.as_u64()?,
        v.get("mediaType")?.as_str()?.to_string(),
    ))
}

fn check_manifest(bytes: &[u8]) {
    let digest = Digest::of(bytes);
    match Manifest::parse(bytes, &digest) {
        Ok(m) => {
            let v: serde_json::Value =
                serde_json::from_slice(bytes).expect("an accepted manifest is JSON");
            assert_eq!(v.get("schemaVersion").and_then(|s| s.as_u64()), Some(2));
            if let Some(mt) = v.get("mediaType") {
                assert_eq!(mt.as_str(), Some(OCI_MANIFEST));
            }
            let layer =
                |l: &ociblk_registry::Layer| (l.digest.to_string(), l.size, l.media_type.clone());
            assert_eq!(
                v.get("config").and_then(descriptor),
                Some(layer(&m.config)),
                "config"
            );
            let layers: Option<Vec<_>> = v
                .get("layers")
                .and_then(|l| l.as_array())
                .map(|a| a.iter().map(descriptor).collect::<Option<_>>())
                .unwrap_or_default();
            let parsed: Vec<_> = m.layers.iter().map(layer).collect();
            assert_eq!(layers, Some(parsed), "layers");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("manifest {digest}: field ")),
                "error does not name the manifest and a field: {msg}"
            );
        }
    }
}

fn check_digest(s: &str) {
    match s.parse::<Digest>() {
        Ok(d) => {
            assert_eq!(d.to_string(), s);
            assert_eq!(format!("sha256:{}", d.hex()), s);
            assert_eq!(
                d.verify("blob", s.as_bytes(), s.len() as u64).is_ok(),
                d == Digest::of(s.as_bytes())
            );
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{s:?}")),
                "error does not quote the input: {msg}"
            );
        }
    }
    let of = Digest::of(s.as_bytes());
    assert!(of.verify("blob", s.as_bytes(), s.len() as u64).is_ok());
    assert!(of.verify("blob", s.as_bytes(), s.len() as u64 + 1).is_err());
    assert_eq!(of.to_string().parse::<Digest>().ok(), Some(of));
}

fn check_access_record(bytes: &[u8]) {
    match AccessRecord::parse(bytes) {
        Ok(r) => {
            let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
            let mut seen = std::collections::HashSet::new();
            for c in &r.chunks {
                assert!(seen.insert(c.chunk.clone()), "{:?} listed twice", c.chunk);
                let line = lines[c.line - 1];
                assert_eq!(
                    line,
                    format!("{} {}", c.chunk.blob, c.chunk.index).as_bytes(),
                    "line {} is not the chunk's",
                    c.line
                );
            }
            let written = r.to_text();
            let again = AccessRecord::parse(written.as_bytes())
                .unwrap_or_else(|e| panic!("written record refused: {e}\n{written}"));
            assert_eq!(again.manifest, r.manifest);
            let chunks =
                |r: &AccessRecord| r.chunks.iter().map(|c| c.chunk.clone()).collect::<Vec<_>>();
            assert_eq!(chunks(&again), chunks(&r));
            assert_eq!(again, AccessRecord::new(r.manifest.clone(), chunks(&r)));
        }
        Err(e) => {
            let lines = bytes.split(|&b| b == b'\n').count().max(1);
            assert!(
                (1..=lines).contains(&e.line),
                "line {} of {lines}: {e}",
                e.line
            );
            assert!(!e.message.is_empty());
        }
    }
}

fn check_redirect(location: &str) {
    let from = "http://127.0.0.1:5000/v2/os/blobs/sha256:00";
    let Ok(target) = redirect_target(&[], from, location) else {
        return;
    };
    // An independent read of the URL: scheme, then the authority up to
    // the path, query or fragment.
    let (scheme, rest) = target
        .split_once("://")
        .unwrap_or_else(|| panic!("followed {target:?}, which is not absolute"));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    assert!(!authority.contains('@'), "credentials in {target:?}");
    // Schemes are case-insensitive (RFC 3986, 3.1): hTtp is plain HTTP.
    match scheme.to_ascii_lowercase().as_str() {
        "https" => {}
        "http" => assert!(
            is_loopback(host_name(authority)),
            "plain HTTP to {target:?}"
        ),
        other => panic!("scheme {other:?} in {target:?}"),
    }
}

fn check_tag_record(bytes: &[u8]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = Cache::open(dir.path().join("cache")).expect("cache");
    let reference = Reference::parse("127.0.0.1:5000/os:v1").expect("reference");
    let tags = dir.path().join("cache/tags/127.0.0.1:5000/os");
    std::fs::create_dir_all(&tags).expect("tag dir");
    std::fs::write(tags.join(":v1"), bytes).expect("tag record");
    let expected = std::str::from_utf8(bytes)
        .ok()
        .and_then(|t| t.trim().parse::<Digest>().ok());
    match cache.tag(&reference) {
        Ok(d) => assert_eq!(d, expected.clone(), "{bytes:?}"),
        Err(e) => {
            assert!(expected.is_none() || bytes.len() > 4096, "{bytes:?}: {e}");
            assert!(e.to_string().contains(":v1"), "{e}");
        }
    }
    let listed: Vec<Digest> = cache
        .info()
        .expect("info")
        .images
        .into_iter()
        .map(|i| i.manifest_digest)
        .collect();
    if bytes.len() <= 4096 {
        assert_eq!(listed, expected.into_iter().collect::<Vec<_>>());
    }
}

fn check_chunk_tables(config: &[u8]) {
    let blob = Digest::of(b"payload");
    let layer = |digest: &Digest| ociblk_registry::Layer {
        digest: digest.clone(),
        size: 0,
        media_type: "application/octet-stream".into(),
    };
    let manifest = Manifest {
        config: layer(&Digest::of(config)),
        layers: vec![layer(&blob), layer(&blob)],
    };
    let digest = Digest::of(b"manifest");
    match chunk_tables(&digest, &manifest, config) {
        Ok(tables) => {
            assert!(tables.keys().all(|d| *d == blob), "{tables:?}");
            let again = chunk_tables(&digest, &manifest, config).expect("same config");
            assert_eq!(tables, again);
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.contains("layers[1]") && e.contains(&digest.to_string()), "{e}");
        }
    }
}

fn check_registries_conf(bytes: &[u8]) {
    let file = Path::new("/etc/containers/registries.conf.d/fuzz.conf");
    let entries = match parse_registries_conf(file, bytes) {
        Ok(entries) => entries,
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with(&format!("{}: field ", file.display())), "{e}");
            return;
        }
    };
    let mut conf = RegistriesConf::default();
    conf.merge(file, bytes).expect("parsed once, merges");
    assert_eq!(conf.registries.len(), entries.len(), "a prefix twice");
    for entry in &entries {
        assert!(!entry.prefix.is_empty() && !entry.location.is_empty(), "{entry:?}");
        assert!(entry.mirrors.iter().all(|m| !m.location.is_empty()), "{entry:?}");
        if entry.prefix.starts_with("*.") {
            assert!(entry.mirrors.is_empty(), "{entry:?}");
            continue;
        }
        let Ok(reference) = Reference::parse(&format!("{}/fuzz:1", entry.prefix)) else {
            continue;
        };
        assert_eq!(
            conf.entry_for(&reference).map(|e| &e.prefix),
            Some(&entry.prefix)
        );
        match conf.endpoints(&reference) {
            Ok(endpoints) => {
                assert!(!entry.blocked, "{entry:?}");
                assert_eq!(endpoints.len(), entry.mirrors.len() + 1);
                let (registry, mirrors) = endpoints.split_last().expect("the registry");
                assert!(!registry.mirror && registry.tags);
                assert!(mirrors.iter().all(|m| m.mirror));
                assert!(endpoints.iter().all(|e| e.reference.tag.as_deref() == Some("1")));
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with(&format!("{}: field ", file.display())), "{e}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let selector = match selector {
        b'R' | b'C' | b'A' | b'M' | b'D' | b'P' | b'L' | b'T' | b'H' | b'G' => selector,
        s => [b'R', b'C', b'A', b'M', b'D', b'P', b'L', b'T', b'H', b'G'][usize::from(s % 10)],
    };
    match selector {
        b'R' => check_reference(&text),
        b'C' => check_challenge(&text),
        b'A' => check_auth_file(&text),
        b'M' => check_manifest(rest),
        b'P' => check_access_record(rest),
        b'L' => check_redirect(&text),
        b'T' => check_tag_record(rest),
        b'H' => check_chunk_tables(rest),
        b'G' => check_registries_conf(rest),
        _ => check_digest(&text),
    }
});
