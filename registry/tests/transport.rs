//! The registry client's transport rules against small loopback fakes
//! (and the real registry behind the counting proxy): where plain HTTP
//! may go, where credentials may go, and waits a server asks for.

use std::io::Write as _;
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ociblk_registry::client::RegistryClient;
use ociblk_registry::{Error, Options};
use ociblk_registry_test_support::fixture::{Fixture, reference};
use ociblk_registry_test_support::loopback::{LoopbackServer, read_request_head};

/// A host that is not loopback: nothing may go there over plain HTTP
/// (TEST-NET-1, never routed; the client must not even try).
const FAR_HOST: &str = "192.0.2.1";
const TIMEOUT: Duration = Duration::from_secs(5);

/// One request a fake saw: its request line and whether it carried an
/// `Authorization` header.
#[derive(Clone, Debug)]
struct Seen {
    request_line: String,
    authorization: Option<String>,
}

/// A loopback fake answering each request with what `answer` makes of it
/// (the status line and extra header lines, without the blank line), and
/// logging what it saw.
struct Fake {
    server: LoopbackServer,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    fn start(answer: impl Fn(&Seen) -> String + Send + 'static) -> Fake {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let server = LoopbackServer::start(move |conn: TcpStream, _| {
            let _ = conn.set_read_timeout(Some(TIMEOUT));
            let Ok((request_line, headers)) = read_request_head(&conn) else {
                return;
            };
            let authorization = headers.iter().find_map(|h| {
                let (name, value) = h.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().to_string())
            });
            let request = Seen {
                request_line: request_line.trim().to_string(),
                authorization,
            };
            let head = answer(&request);
            log.lock().expect("lock").push(request);
            let body = "ok";
            let mut conn = conn;
            let _ = write!(
                conn,
                "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.shutdown(Shutdown::Both);
        });
        Fake { server, seen }
    }

    fn host(&self) -> String {
        self.server.addr.to_string()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Options whose auth file holds `user:password` for `host`.
fn options_with_credentials(dir: &std::path::Path, host: &str) -> Options {
    let auth_file = dir.join("auth.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("ociblk:secret");
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .expect("write auth file");
    Options {
        auth_file: Some(auth_file),
        chunk_timeout: TIMEOUT,
        ..Options::default()
    }
}

/// `GET /v2/os/blobs/sha256:...` through a client of the registry at `host`.
fn get(host: &str, options: &Options) -> Result<(u16, String), Error> {
    let client = RegistryClient::new(&reference(host, "os:v1"), options).expect("client");
    let mut fetched = client.get(
        "os",
        "blobs/sha256:0000",
        &[("Range", "bytes=0-1")],
        Instant::now() + TIMEOUT,
    )?;
    let status = fetched.response.status().as_u16();
    let body = fetched
        .response
        .body_mut()
        .read_to_string()
        .expect("read body");
    Ok((status, body))
}

fn basic(seen: &Seen) -> bool {
    seen.authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Basic "))
}

#[test]
fn a_redirect_to_plain_http_elsewhere_is_refused_before_connecting() {
    let target = format!("http://{FAR_HOST}:5000/storage/blob");
    let registry = Fake::start({
        let target = target.clone();
        move |_| format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}")
    });
    let err = get(&registry.host(), &Options::default()).expect_err("redirect refused");
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::Refused { url, .. } if *url == target),
        "{msg}"
    );
    assert!(
        msg.contains("plain HTTP") && msg.contains(&registry.host()),
        "{msg}"
    );
    assert_eq!(registry.seen().len(), 1);
}

#[test]
fn a_token_realm_over_plain_http_elsewhere_is_refused_and_gets_no_credentials() {
    let realm = format!("http://{FAR_HOST}/token");
    let registry = Fake::start({
        let realm = realm.clone();
        move |_| {
            format!(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"fake\""
            )
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let options = options_with_credentials(dir.path(), &registry.host());
    let err = get(&registry.host(), &options).expect_err("realm refused");
    let msg = err.to_string();
    assert!(
        matches!(&err, Error::Refused { url, .. } if *url == realm),
        "{msg}"
    );
    assert!(msg.contains("plain HTTP"), "{msg}");
    // Without credentials too: the rule is about the connection.
    let err = get(&registry.host(), &Options::default()).expect_err("realm refused");
    assert!(
        matches!(&err, Error::Refused { url, .. } if *url == realm),
        "{err}"
    );
}

#[test]
fn credentials_go_to_a_plain_http_realm_only_on_the_registrys_own_host() {
    let realm = Fake::start(|_| "HTTP/1.1 200 OK\r\nContent-Type: application/json".to_string());
    // The realm is loopback, so it may be reached; but it is another host
    // name than the registry's, so the password does not go there.
    let realm_url = format!("http://localhost:{}/token", realm.server.addr.port());
    let registry = Fake::start(move |_| {
        format!(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm_url}\",service=\"fake\""
        )
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let options = options_with_credentials(dir.path(), &registry.host());
    let err = get(&registry.host(), &options).expect_err("no credentials to the realm");
    assert!(
        matches!(&err, Error::Auth { message, .. } if message.contains("credentials are not sent there")),
        "{err}"
    );
    assert!(realm.seen().is_empty(), "{:?}", realm.seen());
}

#[test]
fn a_redirect_to_another_port_carries_no_authorization() {
    let storage = Fake::start(|_| "HTTP/1.1 200 OK".to_string());
    let storage_url = format!("http://{}/storage/blob", storage.host());
    let registry = Fake::start(move |seen| {
        if seen.request_line.contains("/hop ") {
            format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {storage_url}")
        } else if !basic(seen) {
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"fake\"".to_string()
        } else {
            // Within the registry first (relative), then to storage.
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: hop".to_string()
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let options = options_with_credentials(dir.path(), &registry.host());
    let (status, body) = get(&registry.host(), &options).expect("through the redirects");
    assert_eq!((status, body.as_str()), (200, "ok"));
    let lines: Vec<_> = registry
        .seen()
        .iter()
        .map(|s| (s.request_line.clone(), basic(s)))
        .collect();
    assert_eq!(
        lines,
        [
            ("GET /v2/os/blobs/sha256:0000 HTTP/1.1".to_string(), false),
            ("GET /v2/os/blobs/sha256:0000 HTTP/1.1".to_string(), true),
            ("GET /v2/os/blobs/hop HTTP/1.1".to_string(), true),
        ],
        "the registry's own redirect keeps the credentials"
    );
    let at_storage = storage.seen();
    assert_eq!(at_storage.len(), 1, "{at_storage:?}");
    assert_eq!(
        at_storage[0].authorization, None,
        "another port is another origin"
    );
}

#[test]
fn a_retry_after_no_clock_can_hold_fails_the_request_within_its_timeout() {
    let f = Fixture::new();
    f.assert_retry_after_fails_then_serves(
        |b| b.retry_after_raw = Some(u64::MAX.to_string()),
        |msg, _| assert!(msg.contains(&format!("Retry-After {}s", u64::MAX)), "{msg}"),
    );
}
