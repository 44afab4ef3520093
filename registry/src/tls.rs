//! TLS trust for one registry host, read the way container tools read it
//! (containers-certs.d(5), docker's `certs.d`), and what a failed handshake
//! means in words.
//!
//! A host's directory is `HOST[:PORT]` under the first of
//! `~/.config/containers/certs.d` (not as root), `/etc/containers/certs.d`
//! and `/etc/docker/certs.d` that has one; `--cert-dir DIR` names the
//! directory itself instead, for every host. In it:
//! - `*.crt`: CA certificates, trusted for this host on top of the system's
//!   roots;
//! - `*.cert` with the `*.key` of the same name: a client certificate and
//!   its key, sent when the server asks for one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::error::{Error, Result};

/// The system-wide per-host directories, in the order they are looked in.
pub const SYSTEM_CERTS_D: [&str; 2] = ["/etc/containers/certs.d", "/etc/docker/certs.d"];

/// Where a host's CA and client certificates are read from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CertDirs {
    /// `HOST[:PORT]` under `~/.config/containers/certs.d` (when not root),
    /// [`SYSTEM_CERTS_D`]: the first that exists.
    #[default]
    System,
    /// `HOST[:PORT]` under each of these, the first that exists.
    PerHost(Vec<PathBuf>),
    /// This directory, for every host (`--cert-dir`).
    Fixed(PathBuf),
}

impl CertDirs {
    /// The directory holding `host`'s certificates (`host` as in a
    /// reference: `name[:port]`), if there is one.
    pub fn for_host(&self, host: &str) -> Option<PathBuf> {
        let roots: Vec<PathBuf> = match self {
            CertDirs::Fixed(dir) => return Some(dir.clone()),
            CertDirs::PerHost(roots) => roots.clone(),
            CertDirs::System => {
                let mut roots = Vec::new();
                // SAFETY: geteuid has no preconditions.
                let root = unsafe { libc::geteuid() } == 0;
                if !root && let Some(home) = std::env::var_os("HOME") {
                    roots.push(PathBuf::from(home).join(".config/containers/certs.d"));
                }
                roots.extend(SYSTEM_CERTS_D.iter().map(PathBuf::from));
                roots
            }
        };
        // A host name never holds a path separator or `..` (the reference
        // grammar checks it), so the join stays inside the root.
        roots.into_iter().map(|r| r.join(host)).find(|d| d.is_dir())
    }
}

/// What one host's certificate directory holds.
#[derive(Clone, Default)]
pub struct HostCerts {
    /// The directory read, if any.
    pub dir: Option<PathBuf>,
    /// CA certificates from its `*.crt` files.
    pub cas: Vec<Certificate<'static>>,
    /// The client certificate chain and key (`*.cert` + `*.key`).
    pub client: Option<ClientCert>,
    /// The file the client certificate came from, for messages.
    pub client_file: Option<PathBuf>,
}

impl std::fmt::Debug for HostCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client key stays out of logs.
        f.debug_struct("HostCerts")
            .field("dir", &self.dir)
            .field("cas", &self.cas.len())
            .field("client_file", &self.client_file)
            .finish()
    }
}

impl HostCerts {
    /// Reads `host`'s directory as `dirs` says; no directory is no extra
    /// trust and no client certificate. A file that cannot be read or
    /// parsed is an error naming it, as is a `*.cert` without its `*.key`
    /// or a `*.key` without its `*.cert`.
    pub fn load(dirs: &CertDirs, host: &str) -> Result<HostCerts> {
        let Some(dir) = dirs.for_host(host) else {
            return Ok(HostCerts::default());
        };
        let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .map_err(|e| Error::io(&dir, e))?,
            // A fixed directory that does not exist is a mistake worth naming.
            Err(e) => return Err(Error::io(&dir, e)),
        };
        names.sort();
        let mut certs = HostCerts {
            dir: Some(dir.clone()),
            ..HostCerts::default()
        };
        for path in &names {
            match path.extension().and_then(|e| e.to_str()) {
                Some("crt") => {
                    let found = read_certificates(path)?;
                    if found.is_empty() {
                        return Err(cert_file(path, "no PEM certificate in it"));
                    }
                    certs.cas.extend(found);
                }
                Some("cert") => {
                    let key = path.with_extension("key");
                    if !key.is_file() {
                        return Err(cert_file(
                            path,
                            &format!("client certificate without its key {}", key.display()),
                        ));
                    }
                    // The first pair by name is used, as container tools
                    // offer the first that fits.
                    if certs.client.is_some() {
                        continue;
                    }
                    let chain = read_certificates(path)?;
                    if chain.is_empty() {
                        return Err(cert_file(path, "no PEM certificate in it"));
                    }
                    let key_bytes = std::fs::read(&key).map_err(|e| Error::io(&key, e))?;
                    let private = PrivateKey::from_pem(&key_bytes)
                        .map_err(|e| cert_file(&key, &format!("no PEM private key: {e}")))?;
                    certs.client = Some(ClientCert::new_with_certs(&chain, private));
                    certs.client_file = Some(path.clone());
                }
                Some("key") => {
                    let cert = path.with_extension("cert");
                    if !cert.is_file() {
                        return Err(cert_file(
                            path,
                            &format!("key without its client certificate {}", cert.display()),
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(certs)
    }

    /// The TLS settings for this host: the system's roots plus its CAs,
    /// and its client certificate.
    pub fn tls_config(&self) -> TlsConfig {
        let roots = if self.cas.is_empty() {
            RootCerts::PlatformVerifier
        } else {
            let mut all: Vec<Certificate<'static>> = system_roots().to_vec();
            all.extend(self.cas.iter().cloned());
            RootCerts::Specific(Arc::new(all))
        };
        TlsConfig::builder()
            .root_certs(roots)
            .client_cert(self.client.clone())
            .build()
    }
}

fn cert_file(path: &Path, message: &str) -> Error {
    Error::CertFile {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The certificates in the PEM file `path`.
fn read_certificates(path: &Path) -> Result<Vec<Certificate<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(PemItem::Certificate(c)) => out.push(c),
            Ok(_) => {}
            Err(e) => return Err(cert_file(path, &format!("not PEM: {e}"))),
        }
    }
    Ok(out)
}

/// The operating system's trusted roots, read once.
fn system_roots() -> Arc<[Certificate<'static>]> {
    static ROOTS: OnceLock<Arc<[Certificate<'static>]>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!("reading the system's CA certificates: {e}");
            }
            found
                .certs
                .iter()
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .collect()
        })
        .clone()
}

/// What a failed handshake says about a certificate: the server's (unknown
/// CA, wrong name, expired) or ours (refused). Such a failure is final: no
/// retry, and no fall back to plain HTTP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertProblem {
    UnknownCa,
    WrongName,
    Expired,
    NotYetValid,
    /// The server refused our client certificate, or asked for one and got
    /// none.
    ClientCertRefused(String),
    /// Another certificate problem, as rustls names it.
    Other(String),
}

impl CertProblem {
    /// The certificate problem behind `error`, if it is one.
    pub fn of(error: &ureq::Error) -> Option<CertProblem> {
        use rustls::{AlertDescription, CertificateError};
        let tls = match error {
            ureq::Error::Rustls(e) => e,
            ureq::Error::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
            _ => return None,
        };
        Some(match tls {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => CertProblem::UnknownCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => CertProblem::WrongName,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    CertProblem::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    CertProblem::NotYetValid
                }
                other => CertProblem::Other(format!("{other:?}")),
            },
            rustls::Error::AlertReceived(
                alert @ (AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::AccessDenied),
            ) => CertProblem::ClientCertRefused(format!("{alert:?}")),
            rustls::Error::NoCertificatesPresented => {
                CertProblem::Other("the server presented no certificate".into())
            }
            _ => return None,
        })
    }

    /// The problem in words, for a server `host` whose certificates are
    /// read as `certs` says.
    pub fn describe(&self, host: &str, certs: &HostCerts) -> String {
        let where_cas = match &certs.dir {
            Some(dir) => format!(
                "{} (read: {} CA certificates)",
                dir.display(),
                certs.cas.len()
            ),
            None => format!(
                "none found: put the CA as a *.crt in /etc/containers/certs.d/{host}/ \
                 or pass --cert-dir"
            ),
        };
        match self {
            CertProblem::UnknownCa => format!(
                "{host}'s certificate is signed by a CA that is not trusted \
                 (system roots; per-registry CAs: {where_cas})"
            ),
            CertProblem::WrongName => {
                format!("{host}'s certificate is not valid for the name {host}")
            }
            CertProblem::Expired => format!("{host}'s certificate has expired"),
            CertProblem::NotYetValid => format!("{host}'s certificate is not valid yet"),
            CertProblem::ClientCertRefused(alert) => match &certs.client_file {
                Some(file) => format!(
                    "{host} refused the client certificate {} (TLS alert {alert})",
                    file.display()
                ),
                None => format!(
                    "{host} asks for a client certificate and none is configured \
                     (TLS alert {alert}; put NAME.cert and NAME.key in {})",
                    certs.dir.as_ref().map_or_else(
                        || format!("/etc/containers/certs.d/{host}/ or --cert-dir"),
                        |d| d.display().to_string()
                    )
                ),
            },
            CertProblem::Other(what) => format!("{host}'s certificate is refused: {what}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_directory_is_the_first_that_exists() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(b.path().join("r.example:5000")).expect("mkdir");
        let dirs = CertDirs::PerHost(vec![a.path().into(), b.path().into()]);
        assert_eq!(
            dirs.for_host("r.example:5000"),
            Some(b.path().join("r.example:5000"))
        );
        assert_eq!(dirs.for_host("r.example"), None);
        std::fs::create_dir(a.path().join("r.example:5000")).expect("mkdir");
        assert_eq!(
            dirs.for_host("r.example:5000"),
            Some(a.path().join("r.example:5000"))
        );
        let fixed = CertDirs::Fixed("/x".into());
        assert_eq!(fixed.for_host("any"), Some(PathBuf::from("/x")));
    }

    #[test]
    fn unpaired_or_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dirs = CertDirs::Fixed(dir.path().into());
        assert!(
            HostCerts::load(&dirs, "h")
                .expect("empty dir")
                .cas
                .is_empty()
        );
        std::fs::write(dir.path().join("client.cert"), "x").expect("write");
        let err = HostCerts::load(&dirs, "h").expect_err("no key").to_string();
        assert!(
            err.contains("client.cert") && err.contains("client.key"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("client.cert")).expect("rm");
        std::fs::write(dir.path().join("client.key"), "x").expect("write");
        let err = HostCerts::load(&dirs, "h")
            .expect_err("no cert")
            .to_string();
        assert!(
            err.contains("client.key") && err.contains("client.cert"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("client.key")).expect("rm");
        std::fs::write(dir.path().join("ca.crt"), "not a certificate").expect("write");
        let err = HostCerts::load(&dirs, "h").expect_err("no PEM").to_string();
        assert!(err.contains("ca.crt"), "{err}");
        let missing = CertDirs::Fixed(dir.path().join("none"));
        let err = HostCerts::load(&missing, "h")
            .expect_err("missing")
            .to_string();
        assert!(err.contains("none"), "{err}");
    }
}
