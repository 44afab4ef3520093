//! A token issuer for the registry's `token` authentication: the registry
//! (the real one) sends clients here, and accepts the JSON web tokens this
//! issues, signed with a key whose certificate is in its trust bundle. It
//! grants every scope asked for, anonymously, and logs each request.

use std::io::Write as _;
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::loopback::{LoopbackServer, read_request_head};

pub const ISSUER: &str = "ociblk-test-issuer";
pub const SERVICE: &str = "ociblk-test-registry";

/// One token request: its query string.
pub type TokenRequest = String;

#[derive(Debug)]
pub struct TokenIssuer {
    server: LoopbackServer,
    /// The certificate bundle the registry trusts.
    cert_pem: PathBuf,
    log: Arc<Mutex<Vec<TokenRequest>>>,
}

impl TokenIssuer {
    /// Makes a P-256 key and self-signed certificate in `dir` (openssl) and
    /// starts issuing on a free loopback port.
    pub fn start(dir: &Path) -> TokenIssuer {
        let (key_pem, cert_pem) = (dir.join("token-key.pem"), dir.join("token-cert.pem"));
        crate::pki::new_key_request(
            "token-key.pem",
            &[
                "-x509",
                "-days",
                "1",
                "-subj",
                "/CN=ociblk-test-token",
                "-out",
                "token-cert.pem",
            ],
            dir,
        );
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &pem_der(&key_pem, "PRIVATE KEY"),
            &SystemRandom::new(),
        )
        .expect("P-256 PKCS#8 key");
        let cert_der = pem_der(&cert_pem, "CERTIFICATE");

        let log = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let log = log.clone();
            LoopbackServer::start(move |conn, _| {
                let _ = answer(conn, &key, &cert_der, &log);
            })
        };
        TokenIssuer {
            server,
            cert_pem,
            log,
        }
    }

    /// The registry's `auth:` configuration for this issuer.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: http://{}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.server.addr,
            self.cert_pem.display()
        )
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.log.lock().expect("lock").clone()
    }
}

fn pem_der(path: &Path, label: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(path).expect("read PEM");
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .unwrap_or_else(|| panic!("{} has no {label}", path.display()))
        .0;
    let b64: String = body.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("PEM base64")
}

fn answer(
    conn: TcpStream,
    key: &EcdsaKeyPair,
    cert_der: &[u8],
    log: &Mutex<Vec<TokenRequest>>,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (request_line, _headers) = read_request_head(&conn)?;
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q).to_string();
    log.lock().expect("lock").push(query.clone());
    let mut access = Vec::new();
    for pair in query.split('&') {
        if let Some(scope) = pair.strip_prefix("scope=") {
            let scope = percent_decode(scope);
            let mut parts = scope.splitn(3, ':');
            if let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            {
                access.push(serde_json::json!({
                    "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()
                }));
            }
        }
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let b64url = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = serde_json::json!({
        "typ": "JWT", "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(cert_der)],
    });
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": "", "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .expect("sign token");
    let token = format!("{signing_input}.{}", b64url(signature.as_ref()));
    let body = serde_json::json!({ "token": token, "expires_in": 300 }).to_string();
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.shutdown(Shutdown::Both)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
