//! A loopback HTTP proxy in front of the real registry: it logs every
//! request (to count fetches) and can rewrite blob answers the way some
//! registries and storage back ends behave (429 with Retry-After, Range
//! ignored, 307 redirect to storage, slow answers).

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::loopback::{LoopbackServer, read_request_head};

const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How the proxy treats blob requests (`GET /v2/<repo>/blobs/<digest>`).
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Answer this many blob requests with 429 and `Retry-After`.
    pub too_many: u32,
    pub retry_after_secs: u32,
    /// The `Retry-After` value sent instead of `retry_after_secs`, as is
    /// (a value no client should take at its word).
    pub retry_after_raw: Option<String>,
    /// Drop the `Range` header before forwarding: the registry answers 200.
    pub ignore_range: bool,
    /// Answer blob requests with a 307 to `/storage/...` on the proxy,
    /// which forwards to the registry, as a cloud storage back end does.
    pub redirect_blobs: bool,
    /// Hold each blob request this long before forwarding it (a slow registry).
    pub blob_delay: Duration,
    /// Hold each blob request until this many were in flight at once (or
    /// [`GATHER_LIMIT`] passed): requests made one after another never
    /// meet, requests made side by side all go on together.
    pub gather: usize,
}

/// The longest a blob request is held for [`Behaviour::gather`].
pub const GATHER_LIMIT: Duration = Duration::from_secs(10);

/// One request the proxy saw.
#[derive(Clone, Debug)]
pub struct Logged {
    pub at: Instant,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
}

#[derive(Debug, Default)]
struct State {
    behaviour: Mutex<Behaviour>,
    log: Mutex<Vec<Logged>>,
    /// Blob requests being served now, and the most there ever were.
    blob_active: AtomicUsize,
    blob_max_active: AtomicUsize,
    /// Taken to count a blob request in; `arrived` is signalled then.
    entering: Mutex<()>,
    arrived: Condvar,
}

/// The proxy; stops accepting on drop.
#[derive(Debug)]
pub struct Proxy {
    server: LoopbackServer,
    state: Arc<State>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port in front of `upstream`.
    pub fn start(upstream: SocketAddr, behaviour: Behaviour) -> Proxy {
        let state = Arc::new(State::default());
        *state.behaviour.lock().expect("lock") = behaviour;
        let server = {
            let state = state.clone();
            LoopbackServer::start(move |conn, me| {
                let state = state.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, me, &state);
                });
            })
        };
        Proxy { server, state }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.server.addr.to_string()
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().expect("lock"));
    }

    /// Every request seen so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().expect("lock").clone()
    }

    /// The most blob requests that were in flight at one time.
    pub fn max_concurrent_blob_requests(&self) -> usize {
        self.state.blob_max_active.load(Ordering::SeqCst)
    }

    /// Requests for blob `hex` (by digest hex), redirects and 429s included.
    pub fn blob_requests(&self, hex: &str) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.path.contains("/blobs/sha256:") && l.path.ends_with(hex))
            .collect()
    }
}

/// Serves one request on `client`, then closes the connection.
fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    me: SocketAddr,
    state: &State,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let (request_line, headers) = read_request_head(&client)?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("").to_string(),
    );
    let header = |name: &str| {
        headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let range = header("range");
    let (upstream_path, via_storage) = match path.strip_prefix("/storage") {
        Some(p) => (p.to_string(), true),
        None => (path.clone(), false),
    };
    let is_blob = method == "GET" && upstream_path.contains("/blobs/sha256:");
    let _active = is_blob.then(|| Active::enter(state));
    let behaviour = state.behaviour.lock().expect("lock").clone();
    let log = |status: u16| {
        state.log.lock().expect("lock").push(Logged {
            at: Instant::now(),
            path: path.clone(),
            range: range.clone(),
            status,
        });
    };
    let mut client = client;
    if is_blob && !via_storage && behaviour.too_many > 0 {
        state.behaviour.lock().expect("lock").too_many -= 1;
        log(429);
        let retry_after = behaviour
            .retry_after_raw
            .clone()
            .unwrap_or_else(|| behaviour.retry_after_secs.to_string());
        write!(
            client,
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: {retry_after}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return client.shutdown(Shutdown::Both);
    }
    if is_blob && !via_storage && behaviour.redirect_blobs {
        log(307);
        write!(
            client,
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{me}/storage{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return client.shutdown(Shutdown::Both);
    }
    if is_blob && !behaviour.blob_delay.is_zero() {
        std::thread::sleep(behaviour.blob_delay);
    }
    if is_blob && behaviour.gather > 1 {
        gather(state, behaviour.gather);
    }
    let mut up = TcpStream::connect_timeout(&upstream, IO_TIMEOUT)?;
    up.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut head = format!("{method} {upstream_path} HTTP/1.1\r\n");
    for h in &headers {
        let name = h.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("connection")
            || (behaviour.ignore_range && name.eq_ignore_ascii_case("range"))
        {
            continue;
        }
        head.push_str(h);
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let status = std::str::from_utf8(answer.get(9..12).unwrap_or(b"000"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    log(status);
    client.write_all(&answer)?;
    client.shutdown(Shutdown::Both)
}

/// Waits until `count` blob requests were in flight at once, at most
/// [`GATHER_LIMIT`].
fn gather(state: &State, count: usize) {
    let deadline = Instant::now() + GATHER_LIMIT;
    let mut entering = state.entering.lock().expect("lock");
    while state.blob_max_active.load(Ordering::SeqCst) < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        entering = state.arrived.wait_timeout(entering, left).expect("lock").0;
    }
}

/// Counts a blob request as in flight while alive.
struct Active<'a>(&'a State);

impl<'a> Active<'a> {
    fn enter(state: &'a State) -> Self {
        let _entering = state.entering.lock().expect("lock");
        let now = state.blob_active.fetch_add(1, Ordering::SeqCst) + 1;
        state.blob_max_active.fetch_max(now, Ordering::SeqCst);
        state.arrived.notify_all();
        Active(state)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.blob_active.fetch_sub(1, Ordering::SeqCst);
    }
}
