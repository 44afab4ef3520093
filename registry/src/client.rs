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

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use ureq::http::{Response, StatusCode, Uri};
use ureq::tls::TlsConfig;
use ureq::{Agent, Body};

use crate::challenge::Challenge;
use crate::credentials::{self, Credentials};
use crate::error::{Error, Result};
use crate::limiter::{Limiter, Permit, Priority};
use crate::options::Options;
use crate::reference::{Reference, host_name};
use crate::retry;
use crate::tls::{CertDirs, CertProblem, HostCerts};

/// Attempts on a connection failure: a registry that is down is reported
/// quickly (an offline start should not wait the whole request timeout).
const CONNECT_ATTEMPTS: u32 = 3;
/// Attempts on 429/502/503/504 answers, within the request deadline.
const BUSY_ATTEMPTS: u32 = 8;
/// Largest token response read.
const TOKEN_LIMIT: u64 = 1 << 20;
/// Redirects followed for one request.
const MAX_REDIRECTS: u32 = 10;

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
        let mut authenticated = false;
        let mut connect_failures = 0;
        let mut busy_answers = 0;
        // What went wrong with the previous attempt, for the timeout error.
        let mut last: Option<String> = None;
        loop {
            // Named in errors: the URL over the scheme in use (HTTPS while
            // it is still being found out).
            let url = format!("{}://{}{path}", self.scheme().unwrap_or("https"), self.host);
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
            if Instant::now() >= deadline {
                return Err(timed_out("retrying", &last));
            }
            let authorization = self.authorization(&scope);
            let answer =
                match self.call_registry(&path, headers, authorization.as_deref(), deadline) {
                    Ok(answer) => answer,
                    Err(CallError::Refused(e)) => return Err(e),
                    Err(CallError::OutOfTime) => {
                        return Err(timed_out("waiting for the answer", &last));
                    }
                    Err(CallError::Http {
                        error: ureq::Error::Timeout(_),
                        ..
                    }) => {
                        return Err(timed_out("waiting for the answer", &last));
                    }
                    Err(CallError::Http {
                        url: failed,
                        error: e @ (ureq::Error::Io(_) | ureq::Error::ConnectionFailed),
                    }) => {
                        connect_failures += 1;
                        last = Some(e.to_string());
                        if connect_failures >= self.connect_attempts {
                            return Err(Error::Http {
                                url: failed,
                                source: Box::new(e),
                            });
                        }
                        drop(permit);
                        sleep_before(retry::backoff(connect_failures - 1), deadline);
                        continue;
                    }
                    Err(CallError::Http { url: failed, error }) => {
                        return Err(Error::Http {
                            url: failed,
                            source: Box::new(error),
                        });
                    }
                };
            let Answer {
                url: answered,
                response,
                from_origin,
            } = answer;
            let status = response.status();
            // Only the registry's own challenge is answered: a 401 from
            // where a redirect led gets no credentials.
            if status == StatusCode::UNAUTHORIZED && !authenticated && from_origin {
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
                // The server chooses `wait`: no arithmetic on it may
                // overflow, and no wait outlasts the request's deadline.
                let fits = retry::fits_before(Instant::now(), wait, deadline);
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
                        url: answered,
                        status: status.as_u16(),
                        detail,
                    });
                }
                tracing::info!(url = %answered, %status, ?wait, "registry busy; retrying");
                drop(response);
                drop(permit);
                sleep_before(wait, deadline);
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                return Err(Error::Auth {
                    message: format!(
                        "HTTP {status}{}",
                        if !from_origin {
                            format!(" from {answered}, where {url} redirected")
                        } else if self.known_credentials() {
                            " with the stored credentials".to_string()
                        } else {
                            " (no credentials stored for this registry)".to_string()
                        }
                    ),
                    url,
                });
            }
            return Ok(Fetched {
                url: answered,
                response,
                _permit: permit,
            });
        }
    }

    fn authorization(&self, scope: &str) -> Option<String> {
        self.authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(scope, Instant::now())
    }

    /// The credentials for this registry, looked up on first use.
    fn credentials(&self) -> Result<Option<Credentials>> {
        let mut known = self
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = &*known {
            return Ok(found.clone());
        }
        let found = credentials::lookup_in(&self.auth_files, &self.credentials_host)?;
        *known = Some(found.clone());
        Ok(found)
    }

    /// Whether credentials were looked up and found.
    fn known_credentials(&self) -> bool {
        matches!(
            *self
                .credentials
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            Some(Some(_))
        )
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
        let (value, lifetime) = if challenge.is("basic") {
            let creds = self.credentials()?.ok_or_else(|| {
                auth_error(format!(
                    "{} asks for a password; none is stored for it",
                    self.host
                ))
            })?;
            (creds.basic_header(), None)
        } else {
            let (token, lifetime) = self.fetch_token(url, &challenge, scope, deadline)?;
            (format!("Bearer {token}"), Some(lifetime))
        };
        self.authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(scope, value, lifetime, Instant::now());
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
    ) -> Result<(String, Duration)> {
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
        // The realm is a connection like any other: refused before it is
        // made when the transport rules forbid it.
        let realm_uri = self.transport.check(realm).map_err(|e| Error::Refused {
            url: realm.to_string(),
            message: format!("token realm named by {url}: {e}"),
        })?;
        // Credentials go to the realm over HTTPS, or over plain HTTP only
        // when the realm is on the very host the user reaches the registry
        // on over plain HTTP.
        let basic = match &self.credentials()? {
            None => None,
            Some(creds) if realm_uri.scheme_str() == Some("https") => Some(creds.basic_header()),
            Some(creds)
                if self.scheme() == Some("http")
                    && realm_uri.host().is_some_and(|h| {
                        host_name(h).eq_ignore_ascii_case(host_name(&self.host))
                    }) =>
            {
                Some(creds.basic_header())
            }
            Some(_) => {
                return Err(auth_error(format!(
                    "token realm {realm} is plain HTTP on another host than the registry; \
                     credentials are not sent there"
                )));
            }
        };
        let mut query = format!(
            "scope={}",
            percent_encode(challenge.param("scope").unwrap_or(scope))
        );
        if let Some(service) = challenge.param("service") {
            query.push_str(&format!("&service={}", percent_encode(service)));
        }
        let separator = if realm_uri.query().is_some() {
            '&'
        } else {
            '?'
        };
        let token_url = format!("{realm}{separator}{query}");
        let mut response = match self.call(&token_url, &[], basic.as_deref(), deadline) {
            Ok(answer) => answer.response,
            Err(CallError::Refused(e)) => return Err(e),
            Err(CallError::OutOfTime) => {
                return Err(auth_error("no time left to request a token".into()));
            }
            Err(CallError::Http { error, .. }) => {
                return Err(auth_error(format!("token request to {realm}: {error}")));
            }
        };
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
            expires_in: Option<u64>,
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(TOKEN_LIMIT)
            .read_to_vec()
            .map_err(|e| auth_error(format!("token answer from {realm}: {e}")))?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| auth_error(format!("token answer from {realm}: {e}")))?;
        // The distribution spec's default lifetime, when the answer has none.
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(60));
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_error(format!("token answer from {realm} has no token")))?;
        Ok((token, lifetime))
    }
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens and passwords never reach a log: only which scopes hold one.
        let scopes: Vec<String> = self
            .authorizations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .scopes();
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

impl RegistryClient {
    /// The scheme the registry is spoken to with, once known.
    fn scheme(&self) -> Option<&'static str> {
        *self.scheme.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `GET path` on the registry. While its scheme is unknown (a host plain
    /// HTTP is allowed to), HTTPS is tried first; plain HTTP follows when
    /// HTTPS failed for another reason than a certificate (a registry that
    /// speaks no TLS), and whichever answers is kept.
    fn call_registry(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        authorization: Option<&str>,
        deadline: Instant,
    ) -> std::result::Result<Answer, CallError> {
        if let Some(scheme) = self.scheme() {
            let url = format!("{scheme}://{}{path}", self.host);
            return self.call(&url, headers, authorization, deadline);
        }
        let https = format!("https://{}{path}", self.host);
        let tls_error = match self.call(&https, headers, authorization, deadline) {
            Ok(answer) => {
                *self.scheme.lock().unwrap_or_else(PoisonError::into_inner) = Some("https");
                return Ok(answer);
            }
            Err(CallError::Http { error, .. }) => error,
            Err(other) => return Err(other),
        };
        let http = format!("http://{}{path}", self.host);
        let answer = self.call(&http, headers, authorization, deadline)?;
        tracing::info!(host = %self.host, https = %tls_error,
            "no TLS answer; speaking plain HTTP to this loopback or insecure registry");
        *self.scheme.lock().unwrap_or_else(PoisonError::into_inner) = Some("http");
        Ok(answer)
    }

    /// The TLS settings for `authority` when it is not the registry's host.
    fn tls_for(&self, authority: &str) -> Result<(HostCerts, TlsConfig)> {
        let mut known = self
            .other_tls
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = known.get(authority) {
            return Ok(found.clone());
        }
        let certs = HostCerts::load(&self.cert_dirs, authority)?;
        let config = certs.tls_config();
        known.insert(authority.to_string(), (certs.clone(), config.clone()));
        Ok((certs, config))
    }

    /// One `GET url` with `headers`, following redirects under the
    /// transport rules. `authorization` is sent to `url`'s origin (scheme,
    /// host and port) only, never to another one a redirect leads to.
    fn call(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        authorization: Option<&str>,
        deadline: Instant,
    ) -> std::result::Result<Answer, CallError> {
        let mut uri = self.transport.check(url).map_err(|message| {
            CallError::Refused(Error::Refused {
                url: url.to_string(),
                message,
            })
        })?;
        let home = Origin::of(&uri);
        let mut url = url.to_string();
        let mut hops = 0;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(CallError::OutOfTime)?;
            let from_origin = Origin::of(&uri) == home;
            let authority = uri.authority().map_or("", |a| a.as_str()).to_string();
            let own_host = authority.eq_ignore_ascii_case(&self.host);
            let other = if own_host {
                None
            } else {
                Some(self.tls_for(&authority).map_err(CallError::Refused)?)
            };
            let mut request = self.agent.get(&url);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if from_origin && let Some(auth) = authorization {
                request = request.header("Authorization", auth);
            }
            let mut config = request.config().timeout_global(Some(left));
            if let Some((_, tls)) = &other {
                config = config.tls_config(tls.clone());
            }
            let response =
                config
                    .build()
                    .call()
                    .map_err(|error| match CertProblem::of(&error) {
                        Some(problem) => {
                            let certs = other.as_ref().map_or(&self.certs, |(c, _)| c);
                            CallError::Refused(Error::Tls {
                                url: url.clone(),
                                message: problem.describe(&authority, certs),
                            })
                        }
                        None => CallError::Http {
                            url: url.clone(),
                            error,
                        },
                    })?;
            let redirect = matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308);
            let location = response
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok());
            let (true, Some(location)) = (redirect, location) else {
                return Ok(Answer {
                    url,
                    response,
                    from_origin,
                });
            };
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(CallError::Refused(Error::Protocol {
                    url,
                    message: format!("more than {MAX_REDIRECTS} redirects"),
                }));
            }
            let next = resolve_location(&uri, location).ok_or_else(|| {
                CallError::Refused(Error::Protocol {
                    url: url.clone(),
                    message: format!("redirect to {location:?}, which is not a URL"),
                })
            })?;
            uri = self.transport.check(&next).map_err(|e| {
                CallError::Refused(Error::Refused {
                    url: next.clone(),
                    message: format!("redirect from {url}: {e}"),
                })
            })?;
            tracing::debug!(from = %url, to = %next, "following redirect");
            url = next;
        }
    }
}

/// How long before a token's stated expiry it is no longer sent: a
/// request made just before the end would arrive too late.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);

/// `Authorization` values by token scope, each until its token expires.
#[derive(Default)]
struct TokenCache {
    entries: HashMap<String, (String, Option<Instant>)>,
}

impl TokenCache {
    /// Keeps `value` for `scope`, until `lifetime` from `now` (less a
    /// margin) when given, else for good (Basic credentials).
    fn insert(&mut self, scope: &str, value: String, lifetime: Option<Duration>, now: Instant) {
        // A lifetime too long to add to an Instant never ends.
        let until =
            lifetime.and_then(|l| now.checked_add(l.saturating_sub(TOKEN_MARGIN.min(l / 2))));
        self.entries.insert(scope.to_string(), (value, until));
    }

    /// The value for `scope` at `now`, unless its token has expired.
    fn get(&mut self, scope: &str, now: Instant) -> Option<String> {
        let (value, until) = self.entries.get(scope)?;
        if until.is_some_and(|t| now >= t) {
            self.entries.remove(scope);
            return None;
        }
        Some(value.clone())
    }

    fn scopes(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
}

/// What [`RegistryClient::call`] got: the last URL asked, its answer, and
/// whether that URL has the origin of the first one.
struct Answer {
    url: String,
    response: Response<Body>,
    from_origin: bool,
}

/// Why [`RegistryClient::call`] got no answer.
enum CallError {
    /// The transport rules forbid a connection, or the redirects are bad.
    Refused(Error),
    /// The deadline passed before the next request could start.
    OutOfTime,
    /// The request to `url` failed.
    Http { url: String, error: ureq::Error },
}

/// Which hosts may be reached over plain HTTP.
#[derive(Clone, Debug)]
struct Transport {
    /// `--insecure-registry` hosts, `name` or `name:port`.
    insecure: Vec<String>,
}

impl Transport {
    /// Whether `authority` (`host[:port]`) may be reached over plain HTTP:
    /// a loopback host, or one listed (by name, or name and port).
    fn plain_allowed(&self, authority: &str) -> bool {
        let name = host_name(authority);
        is_loopback(name) || self.insecure.iter().any(|h| h == authority || h == name)
    }

    /// `url`, parsed, when a connection to it is allowed: an `https` URL,
    /// or an `http` one to a host plain HTTP is allowed to. Refused is
    /// anything else, and a URL carrying a user name or password.
    fn check(&self, url: &str) -> std::result::Result<Uri, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| "not an absolute URL".to_string())?;
        if authority.as_str().contains('@') {
            return Err("a URL with credentials in it is not used".into());
        }
        match uri.scheme_str() {
            Some("https") => Ok(uri),
            Some("http") if self.plain_allowed(authority.as_str()) => Ok(uri),
            Some("http") => Err(format!(
                "plain HTTP to {authority}, which is neither a loopback host nor an \
                 --insecure-registry; not connecting"
            )),
            other => Err(format!(
                "scheme {:?} is neither https nor http",
                other.unwrap_or("")
            )),
        }
    }
}

/// Scheme, host and port of a URL: where a credential may go.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    fn of(uri: &Uri) -> Origin {
        let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        Origin {
            port: uri.port_u16().or(default_port),
            host: uri.host().unwrap_or("").to_ascii_lowercase(),
            scheme,
        }
    }
}

/// Where a redirect from `from` with `Location: location` leads, when the
/// transport rules (plain HTTP only to loopback hosts and `insecure` ones)
/// allow going there: the decision [`RegistryClient`] takes at each hop.
pub fn redirect_target(
    insecure: &[String],
    from: &str,
    location: &str,
) -> std::result::Result<String, String> {
    let transport = Transport {
        insecure: insecure.to_vec(),
    };
    let base = transport.check(from)?;
    let next =
        resolve_location(&base, location).ok_or_else(|| format!("{location:?} is not a URL"))?;
    transport.check(&next)?;
    Ok(next)
}

/// The URL a redirect's `Location` names, relative to `base`.
fn resolve_location(base: &Uri, location: &str) -> Option<String> {
    let location = location.trim();
    let has_scheme = location.split_once(':').is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    if has_scheme {
        return Some(location.to_string());
    }
    let scheme = base.scheme_str()?;
    let authority = base.authority()?.as_str();
    if let Some(rest) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{rest}"));
    }
    if location.starts_with('/') {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    let path = base.path();
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    Some(format!("{scheme}://{authority}{dir}{location}"))
}

/// `value` percent-encoded for a query string: every byte but the
/// unreserved characters of RFC 3986.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

    #[test]
    fn tokens_are_used_until_shortly_before_they_expire_and_basic_values_for_good() {
        let now = Instant::now();
        let mut cache = TokenCache::default();
        cache.insert("a", "Bearer t".into(), Some(Duration::from_secs(60)), now);
        cache.insert("b", "Basic x".into(), None, now);
        cache.insert(
            "c",
            "Bearer u".into(),
            Some(Duration::from_secs(u64::MAX)),
            now,
        );
        let at = |secs| now + Duration::from_secs(secs);
        assert_eq!(cache.get("a", at(54)).as_deref(), Some("Bearer t"));
        assert_eq!(
            cache.get("a", at(55)),
            None,
            "within the margin of its expiry"
        );
        assert_eq!(cache.get("a", at(0)), None, "dropped once expired");
        assert_eq!(cache.get("b", at(1_000_000)).as_deref(), Some("Basic x"));
        assert_eq!(cache.get("c", at(1_000_000)).as_deref(), Some("Bearer u"));
        let mut short = TokenCache::default();
        short.insert("s", "Bearer s".into(), Some(Duration::from_secs(4)), now);
        assert_eq!(short.get("s", at(1)).as_deref(), Some("Bearer s"));
        assert_eq!(short.get("s", at(2)), None);
    }

    #[test]
    fn redirect_locations_and_origins() {
        let base: Uri = "http://127.0.0.1:5000/v2/os/blobs/sha256:ab"
            .parse()
            .expect("uri");
        let resolve = |l: &str| resolve_location(&base, l).expect("resolves");
        assert_eq!(resolve("hop"), "http://127.0.0.1:5000/v2/os/blobs/hop");
        assert_eq!(resolve("/s/x?y=1"), "http://127.0.0.1:5000/s/x?y=1");
        assert_eq!(resolve("//cdn.example/x"), "http://cdn.example/x");
        assert_eq!(resolve("https://cdn.example/x"), "https://cdn.example/x");
        let origin = |u: &str| Origin::of(&u.parse::<Uri>().expect("uri"));
        assert_eq!(
            origin("https://R.example/a"),
            origin("https://r.example:443/b")
        );
        assert_ne!(origin("http://r.example/a"), origin("https://r.example/a"));
        assert_ne!(
            origin("http://127.0.0.1:5000/a"),
            origin("http://127.0.0.1:5001/a")
        );

        let transport = Transport {
            insecure: vec!["lab.example:5000".into(), "lab2.example".into()],
        };
        for allowed in [
            "http://[::1]:80/x",
            "http://localhost/x",
            "http://lab.example:5000/x",
            "http://lab2.example:81/x",
            "https://anywhere.example/x",
        ] {
            transport
                .check(allowed)
                .unwrap_or_else(|e| panic!("{allowed}: {e}"));
        }
        for refused in [
            "http://lab.example/x",
            "http://192.0.2.1/x",
            "ftp://127.0.0.1/x",
            "https://user:pw@r.example/x",
            "/relative",
        ] {
            assert!(transport.check(refused).is_err(), "{refused}");
        }
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
