//! The transport of [`RegistryClient`]: which connections are allowed (the
//! rules in [`crate::client`]'s description), one `GET` with its redirects
//! followed hop by hop, each host's TLS settings, and where an
//! `Authorization` may go.

use std::net::IpAddr;
use std::time::Instant;

use ureq::Body;
use ureq::http::{Response, Uri};
use ureq::tls::TlsConfig;

use super::{RegistryClient, lock};
use crate::error::{Error, Result};
use crate::reference::host_name;
use crate::tls::{CertProblem, HostCerts};

/// Redirects followed for one request.
const MAX_REDIRECTS: u32 = 10;

impl RegistryClient {
    /// `GET path` on the registry. While its scheme is unknown (a host plain
    /// HTTP is allowed to), HTTPS is tried first; plain HTTP follows when
    /// HTTPS failed for another reason than a certificate (a registry that
    /// speaks no TLS), and whichever answers is kept.
    pub(super) fn call_registry(
        &self,
        path: &str,
        get: Get,
    ) -> std::result::Result<Answer, CallError> {
        let call_over = |scheme: &str| self.call(&format!("{scheme}://{}{path}", self.host), get);
        if let Some(scheme) = self.scheme() {
            return call_over(scheme);
        }
        let tls_error = match call_over("https") {
            Ok(answer) => {
                *lock(&self.scheme) = Some("https");
                return Ok(answer);
            }
            Err(CallError::Http { error, .. }) => error,
            Err(other) => return Err(other),
        };
        let answer = call_over("http")?;
        tracing::info!(host = %self.host, https = %tls_error,
            "no TLS answer; speaking plain HTTP to this loopback or insecure registry");
        *lock(&self.scheme) = Some("http");
        Ok(answer)
    }

    /// The TLS settings for `authority` when it is not the registry's host.
    fn tls_for(&self, authority: &str) -> Result<(HostCerts, TlsConfig)> {
        let mut known = lock(&self.other_tls);
        if let Some(found) = known.get(authority) {
            return Ok(found.clone());
        }
        let certs = HostCerts::load(&self.cert_dirs, authority)?;
        let config = certs.tls_config();
        known.insert(authority.to_string(), (certs.clone(), config.clone()));
        Ok((certs, config))
    }

    /// One `GET url` with `get`'s headers, following redirects under the
    /// transport rules. `get`'s `authorization` is sent to `url`'s origin
    /// (scheme, host and port) only, never to another one a redirect leads
    /// to.
    pub(super) fn call(&self, url: &str, get: Get) -> std::result::Result<Answer, CallError> {
        let Get {
            headers,
            authorization,
            deadline,
        } = get;
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

/// What a `GET` sends besides its URL, and when it must be answered by.
#[derive(Clone, Copy, Debug)]
pub(super) struct Get<'a> {
    pub(super) headers: &'a [(&'a str, &'a str)],
    /// Goes to the origin of the URL asked only (see [`RegistryClient::call`]).
    pub(super) authorization: Option<&'a str>,
    pub(super) deadline: Instant,
}

/// What [`RegistryClient::call`] got: the last URL asked, its answer, and
/// whether that URL has the origin of the first one.
pub(super) struct Answer {
    pub(super) url: String,
    pub(super) response: Response<Body>,
    pub(super) from_origin: bool,
}

/// Why [`RegistryClient::call`] got no answer.
pub(super) enum CallError {
    /// The transport rules forbid a connection, or the redirects are bad.
    Refused(Error),
    /// The deadline passed before the next request could start.
    OutOfTime,
    /// The request to `url` failed.
    Http { url: String, error: ureq::Error },
}

/// Which hosts may be reached over plain HTTP.
#[derive(Clone, Debug)]
pub(super) struct Transport {
    /// `--insecure-registry` hosts, `name` or `name:port`.
    pub(super) insecure: Vec<String>,
}

impl Transport {
    /// Whether `authority` (`host[:port]`) may be reached over plain HTTP:
    /// a loopback host, or one listed (by name, or name and port).
    pub(super) fn plain_allowed(&self, authority: &str) -> bool {
        let name = host_name(authority);
        is_loopback(name) || self.insecure.iter().any(|h| h == authority || h == name)
    }

    /// `url`, parsed, when a connection to it is allowed: an `https` URL,
    /// or an `http` one to a host plain HTTP is allowed to. Refused is
    /// anything else, and a URL carrying a user name or password.
    pub(super) fn check(&self, url: &str) -> std::result::Result<Uri, String> {
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
pub(super) fn percent_encode(value: &str) -> String {
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

/// Whether `host` (no port) is this machine: plain HTTP is allowed there.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

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
