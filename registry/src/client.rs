//! A blocking client for one registry host: the OCI distribution API v2
//! over `ureq`, with token auth, a bound on requests in flight and retries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use ureq::http::{Response, StatusCode};
use ureq::tls::{RootCerts, TlsConfig};
use ureq::{Agent, Body};

use crate::challenge::Challenge;
use crate::credentials::{self, Credentials};
use crate::error::{Error, Result};
use crate::limiter::{Limiter, Permit, Priority};
use crate::options::Options;
use crate::reference::{Reference, host_name};
use crate::retry;

/// Attempts on a connection failure: a registry that is down is reported
/// quickly (an offline start should not wait the whole request timeout).
const CONNECT_ATTEMPTS: u32 = 3;
/// Attempts on 429/502/503/504 answers, within the request deadline.
const BUSY_ATTEMPTS: u32 = 8;
/// Largest token response read.
const TOKEN_LIMIT: u64 = 1 << 20;

/// A response together with the request slot it occupies until dropped.
#[derive(Debug)]
pub struct Fetched {
    pub url: String,
    pub response: Response<Body>,
    _permit: Permit,
}

/// The client of one registry host.
#[derive(Debug)]
pub struct RegistryClient {
    host: String,
    base: String,
    agent: Agent,
    credentials: Option<Credentials>,
    /// `Authorization` values by token scope, from earlier challenges.
    authorizations: Mutex<HashMap<String, String>>,
    limiter: Arc<Limiter>,
    timeout: Duration,
}

impl RegistryClient {
    /// A client for the registry of `reference`. Makes no request: a client
    /// exists also while its registry is down.
    pub fn new(reference: &Reference, options: &Options) -> Result<Self> {
        let host = reference.api_host().to_string();
        let plain = is_loopback(host_name(&host))
            || options
                .insecure_registries
                .iter()
                .any(|h| *h == host || h == host_name(&host));
        let scheme = if plain { "http" } else { "https" };
        let mut config = Agent::config_builder()
            .http_status_as_error(false)
            // Keep the token on a redirect within the registry; never send
            // it to another host (blob storage URLs carry their own grant).
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .https_only(!plain)
            .timeout_connect(Some(options.chunk_timeout.min(Duration::from_secs(10))))
            .user_agent(concat!("ociblk/", env!("CARGO_PKG_VERSION")))
            .tls_config(
                TlsConfig::builder()
                    .root_certs(RootCerts::PlatformVerifier)
                    .build(),
            );
        if is_loopback(host_name(&host)) {
            config = config.proxy(None);
        }
        let auth_file = options
            .auth_file
            .clone()
            .or_else(credentials::default_auth_file);
        let credentials = match auth_file {
            Some(file) => credentials::lookup(&file, &reference.host)?,
            None => None,
        };
        Ok(RegistryClient {
            base: format!("{scheme}://{host}"),
            agent: config.build().new_agent(),
            credentials,
            authorizations: Mutex::new(HashMap::new()),
            limiter: Limiter::for_host(&host, options.max_in_flight),
            timeout: options.chunk_timeout,
            host,
        })
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
        let url = format!("{}/v2/{repository}/{path}", self.base);
        let scope = format!("repository:{repository}:pull");
        let mut authenticated = false;
        let mut connect_failures = 0;
        let mut busy_answers = 0;
        // What went wrong with the previous attempt, for the timeout error.
        let mut last: Option<String> = None;
        loop {
            let timed_out = |what: &str, last: &Option<String>| Error::Timeout {
                url: url.clone(),
                timeout: self.timeout,
                last: match last {
                    Some(l) => format!("{what}; the attempt before: {l}"),
                    None => what.to_string(),
                },
            };
            let permit = match held.take() {
                Some(permit) => permit,
                None => self
                    .limiter
                    .acquire_as(deadline, priority)
                    .ok_or_else(|| timed_out("waiting for a request slot", &last))?,
            };
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| timed_out("retrying", &last))?;
            let mut request = self.agent.get(&url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(auth) = self.authorization(&scope) {
                request = request.header("Authorization", auth);
            }
            let result = request.config().timeout_global(Some(left)).build().call();
            let response = match result {
                Ok(r) => r,
                Err(ureq::Error::Timeout(_)) => {
                    return Err(timed_out("waiting for the answer", &last));
                }
                Err(e @ (ureq::Error::Io(_) | ureq::Error::ConnectionFailed)) => {
                    connect_failures += 1;
                    last = Some(e.to_string());
                    if connect_failures >= CONNECT_ATTEMPTS {
                        return Err(Error::Http {
                            url,
                            source: Box::new(e),
                        });
                    }
                    drop(permit);
                    sleep_before(retry::backoff(connect_failures - 1), deadline);
                    continue;
                }
                Err(e) => {
                    return Err(Error::Http {
                        url,
                        source: Box::new(e),
                    });
                }
            };
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !authenticated {
                authenticated = true;
                drop(permit);
                self.authenticate(&url, &scope, &response, deadline)?;
                continue;
            }
            if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
                busy_answers += 1;
                last = Some(format!("HTTP {status}"));
                let asked = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry::retry_after(v, SystemTime::now()));
                let wait = asked.unwrap_or_else(|| retry::backoff(busy_answers - 1));
                let fits = Instant::now() + wait < deadline;
                if busy_answers >= BUSY_ATTEMPTS || !fits {
                    let detail = match asked {
                        Some(w) if !fits => format!(
                            "Retry-After {}s is beyond the {:?} request timeout",
                            w.as_secs(),
                            self.timeout
                        ),
                        _ => format!("still busy after {busy_answers} attempts"),
                    };
                    return Err(Error::Status {
                        url,
                        status: status.as_u16(),
                        detail,
                    });
                }
                tracing::info!(%url, %status, ?wait, "registry busy; retrying");
                drop(response);
                drop(permit);
                sleep_before(wait, deadline);
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(Error::Auth {
                    url,
                    message: format!(
                        "HTTP {status}{}",
                        if self.credentials.is_some() {
                            " with the stored credentials"
                        } else {
                            " (no credentials stored for this registry)"
                        }
                    ),
                });
            }
            return Ok(Fetched {
                url,
                response,
                _permit: permit,
            });
        }
    }

    fn authorization(&self, scope: &str) -> Option<String> {
        self.authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(scope)
            .cloned()
    }

    /// Obtains the `Authorization` value a 401 answer's challenge asks for.
    fn authenticate(
        &self,
        url: &str,
        scope: &str,
        response: &Response<Body>,
        deadline: Instant,
    ) -> Result<()> {
        let auth_error = |message: String| Error::Auth {
            url: url.to_string(),
            message,
        };
        let challenge = response
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(Challenge::parse)
            .find(|c| c.is("bearer") || c.is("basic"))
            .ok_or_else(|| auth_error("HTTP 401 without a Bearer or Basic challenge".into()))?;
        let value = if challenge.is("basic") {
            let creds = self.credentials.as_ref().ok_or_else(|| {
                auth_error(format!(
                    "{} asks for a password; none is stored for it",
                    self.host
                ))
            })?;
            creds.basic_header()
        } else {
            format!(
                "Bearer {}",
                self.fetch_token(url, &challenge, scope, deadline)?
            )
        };
        self.authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(scope.to_string(), value);
        Ok(())
    }

    /// Asks the challenge's realm for a token (anonymously, or with the
    /// stored credentials).
    fn fetch_token(
        &self,
        url: &str,
        challenge: &Challenge,
        scope: &str,
        deadline: Instant,
    ) -> Result<String> {
        let auth_error = |message: String| Error::Auth {
            url: url.to_string(),
            message,
        };
        let realm = challenge
            .param("realm")
            .ok_or_else(|| auth_error("Bearer challenge without realm".into()))?;
        if !realm.starts_with("https://") && !realm.starts_with("http://") {
            return Err(auth_error(format!(
                "token realm {realm:?} is not an http(s) URL"
            )));
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or_else(|| auth_error("no time left to request a token".into()))?;
        let mut request = self
            .agent
            .get(realm)
            .query("scope", challenge.param("scope").unwrap_or(scope));
        if let Some(service) = challenge.param("service") {
            request = request.query("service", service);
        }
        if let Some(creds) = &self.credentials {
            if realm.starts_with("http://") && !self.base.starts_with("http://") {
                return Err(auth_error(format!(
                    "token realm {realm} is plain HTTP; credentials are not sent there"
                )));
            }
            request = request.header("Authorization", creds.basic_header());
        }
        let mut response = request
            .config()
            .timeout_global(Some(left))
            .build()
            .call()
            .map_err(|e| auth_error(format!("token request to {realm}: {e}")))?;
        if !response.status().is_success() {
            return Err(auth_error(format!(
                "token request to {realm}: HTTP {}",
                response.status()
            )));
        }
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(TOKEN_LIMIT)
            .read_to_vec()
            .map_err(|e| auth_error(format!("token answer from {realm}: {e}")))?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| auth_error(format!("token answer from {realm}: {e}")))?;
        answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_error(format!("token answer from {realm} has no token")))
    }
}

/// Sleeps `wait`, but not past `deadline`.
fn sleep_before(wait: Duration, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    std::thread::sleep(wait.min(left));
}

/// Whether `host` (no port) is this machine: plain HTTP is allowed there.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
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
        let base = |r: &str| {
            let r = Reference::parse(r).expect("reference");
            RegistryClient::new(&r, &opts).expect("client").base
        };
        assert_eq!(base("127.0.0.1:5000/os"), "http://127.0.0.1:5000");
        assert_eq!(base("localhost/os"), "http://localhost");
        assert_eq!(base("[::1]:5000/os"), "http://[::1]:5000");
        assert_eq!(base("lab.example:5000/os"), "http://lab.example:5000");
        assert_eq!(base("lab.example/os"), "https://lab.example");
        assert_eq!(
            base("registry.example.com/os"),
            "https://registry.example.com"
        );
    }
}
