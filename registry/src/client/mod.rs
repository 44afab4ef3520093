//! A blocking client for one registry host: the OCI distribution API v2
//! over `ureq`, with token auth, a bound on requests in flight and retries.
//!
//! Transport rules, for every connection made (the registry, each redirect
//! hop, each token realm): plain HTTP only to a loopback host or one given
//! with `--insecure-registry`, anything else is refused before connecting.
//! The registry itself is asked over HTTPS first; plain HTTP is tried only
//! where it is allowed, when the HTTPS attempt fails for another reason than
//! a certificate, and the choice then holds for the client's life.
//! Each host's TLS trust is its own (see [`crate::tls`]): the system roots
//! plus its `certs.d` CAs, and its client certificate, sent to it alone.
//! A certificate problem is final: not retried, reported once in words.
//! Redirects are followed here, not by `ureq`, so that each hop is checked
//! and an `Authorization` goes only to the origin (scheme, host and port) it
//! was made for: a blob redirect to storage elsewhere carries none.

mod auth;
mod transport;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ureq::http::{Response, StatusCode};
use ureq::tls::TlsConfig;
use ureq::{Agent, Body};

use crate::credentials::{self, Credentials};
use crate::error::{Error, Result};
use crate::limiter::{Limiter, Permit, Priority};
use crate::options::Options;
use crate::reference::{Reference, host_name};
use crate::retry;
use crate::tls::{CertDirs, HostCerts};
use auth::TokenCache;
use transport::{Answer, CallError, Get, Transport};
pub use transport::{is_loopback, redirect_target};

/// Attempts on a connection failure: a registry that is down is reported
/// quickly (an offline start should not wait the whole request timeout).
const CONNECT_ATTEMPTS: u32 = 3;
/// Attempts on 429/502/503/504 answers, within the request deadline.
const BUSY_ATTEMPTS: u32 = 8;

/// A response together with the request slot it occupies until dropped.
#[derive(Debug)]
pub struct Fetched {
    pub url: String,
    pub response: Response<Body>,
    _permit: Permit,
}

/// The client of one registry host.
pub struct RegistryClient {
    host: String,
    /// `https` or `http` once known; unknown (`None`) only while HTTPS has
    /// not answered yet on a host plain HTTP is allowed to.
    scheme: Mutex<Option<&'static str>>,
    agent: Agent,
    /// The registry host's certificate directory.
    certs: HostCerts,
    cert_dirs: CertDirs,
    /// TLS settings of other hosts reached (redirects, token realms).
    other_tls: Mutex<HashMap<String, (HostCerts, TlsConfig)>>,
    /// The auth files credentials for this registry are looked up in.
    auth_files: Vec<std::path::PathBuf>,
    /// The registry as auth files name it (`host[:port]`, as in the reference).
    credentials_host: String,
    /// The credentials, once looked up (at the first challenge: a
    /// registry that asks for none never runs a credential helper).
    credentials: Mutex<Option<Option<Credentials>>>,
    /// `Authorization` values by token scope, from earlier challenges,
    /// until the token expires.
    authorizations: Mutex<TokenCache>,
    limiter: Arc<Limiter>,
    timeout: Duration,
    transport: Transport,
    /// Attempts on a connection failure.
    connect_attempts: u32,
}

impl RegistryClient {
    /// A client for the registry of `reference`. Makes no request: a client
    /// exists also while its registry is down.
    pub fn new(reference: &Reference, options: &Options) -> Result<Self> {
        let host = reference.api_host().to_string();
        let transport = Transport {
            insecure: options.insecure_registries.clone(),
        };
        let plain = transport.plain_allowed(&host);
        let certs = HostCerts::load(&options.cert_dirs, &host)?;
        let mut config = Agent::config_builder()
            .http_status_as_error(false)
            // Redirects are followed by `RegistryClient::call`, which checks
            // every hop and keeps credentials to their origin.
            .max_redirects(0)
            .https_only(!plain)
            .timeout_connect(Some(options.chunk_timeout.min(Duration::from_secs(10))))
            .user_agent(concat!("ociblk/", env!("CARGO_PKG_VERSION")))
            .tls_config(certs.tls_config());
        if is_loopback(host_name(&host)) {
            config = config.proxy(None);
        }
        let auth_files = match &options.auth_file {
            Some(file) => vec![file.clone()],
            None => credentials::default_auth_files(),
        };
        Ok(RegistryClient {
            scheme: Mutex::new(if plain { None } else { Some("https") }),
            agent: config.build().new_agent(),
            certs,
            cert_dirs: options.cert_dirs.clone(),
            other_tls: Mutex::new(HashMap::new()),
            auth_files,
            credentials_host: reference.host.clone(),
            credentials: Mutex::new(None),
            authorizations: Mutex::new(TokenCache::default()),
            limiter: Limiter::for_host(&host, options.max_in_flight),
            timeout: options.chunk_timeout,
            transport,
            connect_attempts: CONNECT_ATTEMPTS,
            host,
        })
    }

    /// The same client, trying a failed connection `attempts` times in all.
    pub fn with_connect_attempts(mut self, attempts: u32) -> Self {
        self.connect_attempts = attempts.max(1);
        self
    }

    /// `host[:port]` of the registry.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The bound on one request, retries included.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET /v2/<repository>/<path>` with `headers`, before `deadline`.
    ///
    /// Answers 401 by authenticating as the challenge asks (once), retries
    /// connection failures and 429/502/503/504 with backoff honouring
    /// `Retry-After`, and returns any other answer for the caller to judge.
    pub fn get(
        &self,
        repository: &str,
        path: &str,
        headers: &[(&str, &str)],
        deadline: Instant,
    ) -> Result<Fetched> {
        self.get_as(
            repository,
            path,
            headers,
            deadline,
            Priority::Foreground,
            None,
        )
    }

    /// Waits until `deadline` for a request slot at `priority`.
    pub fn request_slot(&self, deadline: Instant, priority: Priority) -> Option<Permit> {
        self.limiter.acquire_as(deadline, priority)
    }

    /// [`RegistryClient::get`] whose request slots are taken at `priority`;
    /// the first attempt uses `held` when the caller brings a slot.
    pub fn get_as(
        &self,
        repository: &str,
        path: &str,
        headers: &[(&str, &str)],
        deadline: Instant,
        priority: Priority,
        mut held: Option<Permit>,
    ) -> Result<Fetched> {
        let path = format!("/v2/{repository}/{path}");
        let scope = format!("repository:{repository}:pull");
        let mut attempts = Attempts::default();
        loop {
            // Named in errors: the URL over the scheme in use (HTTPS while
            // it is still being found out).
            let url = format!("{}://{}{path}", self.scheme().unwrap_or("https"), self.host);
            let permit = match held.take() {
                Some(permit) => permit,
                None => self
                    .limiter
                    .acquire_as(deadline, priority)
                    .ok_or_else(|| self.timed_out(&url, "waiting for a request slot", &attempts))?,
            };
            if Instant::now() >= deadline {
                return Err(self.timed_out(&url, "retrying", &attempts));
            }
            let authorization = self.authorization(&scope);
            let get = Get {
                headers,
                authorization: authorization.as_deref(),
                deadline,
            };
            let answer = match self.call_registry(&path, get) {
                Ok(answer) => answer,
                Err(failed) => {
                    let wait = self.after_failed_call(failed, &url, &mut attempts)?;
                    drop(permit);
                    sleep_before(wait, deadline);
                    continue;
                }
            };
            match self.judge(answer, &url, deadline, &mut attempts)? {
                Judged::Served(Answer { url, response, .. }) => {
                    return Ok(Fetched {
                        url,
                        response,
                        _permit: permit,
                    });
                }
                Judged::Challenged(response) => {
                    drop(permit);
                    self.authenticate(&url, &scope, &response, deadline)?;
                }
                Judged::Busy(wait) => {
                    drop(permit);
                    sleep_before(wait, deadline);
                }
            }
        }
    }

    /// After a request for `url` got no answer: how long to wait before
    /// the next attempt (a connection failure, while attempts are left),
    /// or the error that ends the request.
    fn after_failed_call(
        &self,
        failed: CallError,
        url: &str,
        attempts: &mut Attempts,
    ) -> Result<Duration> {
        match failed {
            CallError::Refused(e) => Err(e),
            CallError::OutOfTime
            | CallError::Http {
                error: ureq::Error::Timeout(_),
                ..
            } => Err(self.timed_out(url, "waiting for the answer", attempts)),
            CallError::Http {
                url: failed,
                error: e @ (ureq::Error::Io(_) | ureq::Error::ConnectionFailed),
            } => {
                attempts.connect_failures += 1;
                attempts.last = Some(e.to_string());
                if attempts.connect_failures >= self.connect_attempts {
                    return Err(Error::Http {
                        url: failed,
                        source: Box::new(e),
                    });
                }
                Ok(retry::backoff(attempts.connect_failures - 1))
            }
            CallError::Http { url: failed, error } => Err(Error::Http {
                url: failed,
                source: Box::new(error),
            }),
        }
    }

    /// What the registry's `answer` to a request for `url` means: the
    /// answer for the caller, a challenge to answer (once), a busy
    /// registry to ask again after a wait, or an error.
    fn judge(
        &self,
        answer: Answer,
        url: &str,
        deadline: Instant,
        attempts: &mut Attempts,
    ) -> Result<Judged> {
        let status = answer.response.status();
        // Only the registry's own challenge is answered: a 401 from
        // where a redirect led gets no credentials.
        if status == StatusCode::UNAUTHORIZED && !attempts.authenticated && answer.from_origin {
            attempts.authenticated = true;
            return Ok(Judged::Challenged(answer.response));
        }
        if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
            return self.busy(answer, deadline, attempts).map(Judged::Busy);
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Error::Auth {
                message: format!(
                    "HTTP {status}{}",
                    if !answer.from_origin {
                        format!(" from {}, where {url} redirected", answer.url)
                    } else if self.known_credentials() {
                        " with the stored credentials".to_string()
                    } else {
                        " (no credentials stored for this registry)".to_string()
                    }
                ),
                url: url.to_string(),
            });
        }
        Ok(Judged::Served(answer))
    }

    /// How long to wait before asking a busy registry (429/502/503/504)
    /// again: what its `Retry-After` asks, else a backoff. An error when it
    /// has been busy too often, or asks for a wait past `deadline`.
    fn busy(&self, answer: Answer, deadline: Instant, attempts: &mut Attempts) -> Result<Duration> {
        let Answer {
            url: answered,
            response,
            ..
        } = answer;
        let status = response.status();
        attempts.busy_answers += 1;
        attempts.last = Some(format!("HTTP {status}"));
        let asked = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::retry_after(v, SystemTime::now()));
        let wait = asked.unwrap_or_else(|| retry::backoff(attempts.busy_answers - 1));
        // The server chooses `wait`: no arithmetic on it may
        // overflow, and no wait outlasts the request's deadline.
        let fits = retry::fits_before(Instant::now(), wait, deadline);
        if attempts.busy_answers >= BUSY_ATTEMPTS || !fits {
            let detail = match asked {
                Some(w) if !fits => format!(
                    "Retry-After {}s is beyond the {:?} request timeout",
                    w.as_secs(),
                    self.timeout
                ),
                _ => format!("still busy after {} attempts", attempts.busy_answers),
            };
            return Err(Error::Status {
                url: answered,
                status: status.as_u16(),
                detail,
            });
        }
        tracing::info!(url = %answered, %status, ?wait, "registry busy; retrying");
        Ok(wait)
    }

    /// The error of a request for `url` that ran out of time while doing
    /// `what`, with what went wrong with the attempt before.
    fn timed_out(&self, url: &str, what: &str, attempts: &Attempts) -> Error {
        Error::Timeout {
            url: url.to_string(),
            timeout: self.timeout,
            last: match &attempts.last {
                Some(l) => format!("{what}; the attempt before: {l}"),
                None => what.to_string(),
            },
        }
    }

    /// The scheme the registry is spoken to with, once known.
    fn scheme(&self) -> Option<&'static str> {
        *lock(&self.scheme)
    }
}

/// What one request's attempts have met so far.
#[derive(Debug, Default)]
struct Attempts {
    /// A challenge was answered: a second 401 is final.
    authenticated: bool,
    connect_failures: u32,
    busy_answers: u32,
    /// What went wrong with the previous attempt, for the timeout error.
    last: Option<String>,
}

/// What a registry's answer means for the request (see
/// [`RegistryClient::judge`]).
enum Judged {
    /// The answer the caller gets.
    Served(Answer),
    /// A challenge to authenticate for, before asking again.
    Challenged(Response<Body>),
    /// The registry is busy: ask again after this wait.
    Busy(Duration),
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens and passwords never reach a log: only which scopes hold one.
        let scopes: Vec<String> = lock(&self.authorizations).scopes();
        f.debug_struct("RegistryClient")
            .field("host", &self.host)
            .field("scheme", &self.scheme())
            .field("certs", &self.certs)
            .field("credentials", &self.credentials)
            .field("authorized_scopes", &scopes)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// `mutex` locked, also when a thread panicked holding it: the client's
/// caches and its scheme stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sleeps `wait`, but not past `deadline`.
fn sleep_before(wait: Duration, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    std::thread::sleep(wait.min(left));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_or_listed() {
        let opts = Options {
            insecure_registries: vec!["lab.example:5000".into()],
            ..Options::default()
        };
        // `None`: HTTPS first, plain HTTP allowed after it.
        let scheme = |r: &str| {
            let r = Reference::parse(r).expect("reference");
            RegistryClient::new(&r, &opts).expect("client").scheme()
        };
        assert_eq!(scheme("127.0.0.1:5000/os"), None);
        assert_eq!(scheme("localhost/os"), None);
        assert_eq!(scheme("[::1]:5000/os"), None);
        assert_eq!(scheme("lab.example:5000/os"), None);
        assert_eq!(scheme("lab.example/os"), Some("https"));
        assert_eq!(scheme("registry.example.com/os"), Some("https"));
    }
}
