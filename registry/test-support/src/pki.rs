//! A certificate authority made by the test with `openssl`, issuing server
//! certificates (valid, for another name, expired) and client certificates,
//! and laying them out as a containers-certs.d(5) directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_tool;

/// A CA in a temp dir of its own.
#[derive(Debug)]
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    name: String,
}

/// A certificate and its key, PEM files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// When an issued certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From now, for a day.
    Current,
    /// 1-2 January 2020: long expired.
    Expired,
}

fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new(require_tool("openssl", "openssl"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` in `cwd` making a new P-256 key, unencrypted, into the
/// file `key`, with the rest of its arguments `args`.
pub fn new_key_request(key: &str, args: &[&str], cwd: &Path) {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
    ];
    all.extend_from_slice(args);
    openssl(&all, cwd);
}

impl TestCa {
    /// A new self-signed P-256 CA called `name`.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("temp dir for the CA");
        let cert = dir.path().join("ca.pem");
        new_key_request(
            "ca.key",
            &[
                "-x509",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir.path(),
        );
        // The database `openssl ca` keeps, for certificates with set dates.
        std::fs::write(dir.path().join("index.txt"), "").expect("index");
        std::fs::write(dir.path().join("serial"), "1000\n").expect("serial");
        std::fs::write(
            dir.path().join("ca.cnf"),
            "[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\nserial=serial\n\
             default_md=sha256\npolicy=p\nunique_subject=no\n[p]\ncommonName=supplied\n",
        )
        .expect("ca.cnf");
        TestCa {
            dir,
            cert,
            name: name.to_string(),
        }
    }

    /// A certificate for `cn` with the subjectAltNames `sans` (as openssl
    /// writes them: `IP:127.0.0.1,DNS:localhost`), for a server or a
    /// client (`usage`: `serverAuth` or `clientAuth`).
    fn issue(&self, file: &str, cn: &str, sans: &str, usage: &str, validity: Validity) -> Issued {
        let d = self.dir.path();
        let key = format!("{file}.key");
        let csr = format!("{file}.csr");
        let crt = format!("{file}.pem");
        let ext = format!("{file}.ext");
        new_key_request(&key, &["-out", &csr, "-subj", &format!("/CN={cn}")], d);
        let mut extensions = format!("extendedKeyUsage={usage}\n");
        if !sans.is_empty() {
            extensions.push_str(&format!("subjectAltName={sans}\n"));
        }
        std::fs::write(d.join(&ext), extensions).expect("extensions");
        let dates: Vec<&str> = match validity {
            Validity::Current => vec!["-days", "1"],
            Validity::Expired => vec![
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200102000000Z",
            ],
        };
        openssl(
            &[
                "ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.pem", "-keyfile",
                "ca.key", "-in", &csr, "-out", &crt, "-extfile", &ext,
            ]
            .into_iter()
            .chain(dates)
            .collect::<Vec<_>>(),
            d,
        );
        Issued {
            cert: d.join(crt),
            key: d.join(key),
        }
    }

    /// A server certificate valid for 127.0.0.1 and localhost.
    pub fn server(&self, file: &str) -> Issued {
        self.issue(
            file,
            "127.0.0.1",
            "IP:127.0.0.1,DNS:localhost",
            "serverAuth",
            Validity::Current,
        )
    }

    /// A server certificate valid only for `dns_name`.
    pub fn server_for(&self, file: &str, dns_name: &str, validity: Validity) -> Issued {
        let sans = if dns_name == "127.0.0.1" {
            "IP:127.0.0.1".to_string()
        } else {
            format!("DNS:{dns_name}")
        };
        self.issue(file, dns_name, &sans, "serverAuth", validity)
    }

    /// A client certificate for `cn`.
    pub fn client(&self, file: &str, cn: &str) -> Issued {
        self.issue(file, cn, "", "clientAuth", Validity::Current)
    }

    /// Writes a containers-certs.d(5) directory at `dir`: this CA as
    /// `NAME.crt`, and `client` as `client.cert` + `client.key`.
    pub fn certs_d(&self, dir: &Path, client: Option<&Issued>) -> PathBuf {
        std::fs::create_dir_all(dir).expect("cert dir");
        std::fs::copy(&self.cert, dir.join(format!("{}.crt", self.name))).expect("copy CA");
        if let Some(client) = client {
            std::fs::copy(&client.cert, dir.join("client.cert")).expect("copy client cert");
            std::fs::copy(&client.key, dir.join("client.key")).expect("copy client key");
        }
        dir.to_path_buf()
    }
}
