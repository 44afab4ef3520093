//! Authentication for [`RegistryClient`]: the credentials looked up for its
//! registry, the answer to a 401's `Basic` or `Bearer` challenge (a token
//! from the challenge's realm), and the `Authorization` values kept by token
//! scope until they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use ureq::Body;
use ureq::http::{Response, Uri};

use super::transport::{CallError, Get, percent_encode};
use super::{RegistryClient, lock};
use crate::challenge::Challenge;
use crate::credentials::{self, Credentials};
use crate::error::{Error, Result};
use crate::reference::host_name;

/// Largest token response read.
const TOKEN_LIMIT: u64 = 1 << 20;

impl RegistryClient {
    /// The `Authorization` value kept for `scope`, unless its token expired.
    pub(super) fn authorization(&self, scope: &str) -> Option<String> {
        lock(&self.authorizations).get(scope, Instant::now())
    }

    /// The credentials for this registry, looked up on first use.
    fn credentials(&self) -> Result<Option<Credentials>> {
        let mut known = lock(&self.credentials);
        if let Some(found) = &*known {
            return Ok(found.clone());
        }
        let found = credentials::lookup_in(&self.auth_files, &self.credentials_host)?;
        *known = Some(found.clone());
        Ok(found)
    }

    /// Whether credentials were looked up and found.
    pub(super) fn known_credentials(&self) -> bool {
        matches!(*lock(&self.credentials), Some(Some(_)))
    }

    /// Obtains the `Authorization` value a 401 answer's challenge asks for.
    pub(super) fn authenticate(
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
        lock(&self.authorizations).insert(scope, value, lifetime, Instant::now());
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
        let basic = self.realm_authorization(url, realm, &realm_uri)?;
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
        let get = Get {
            headers: &[],
            authorization: basic.as_deref(),
            deadline,
        };
        let mut response = match self.call(&token_url, get) {
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

    /// The `Authorization` a token request to `realm` (named by the
    /// challenge of `url`) carries: the stored credentials, if any, where
    /// they may go. They go to the realm over HTTPS, or over plain HTTP only
    /// when the realm is on the very host the user reaches the registry on
    /// over plain HTTP.
    fn realm_authorization(
        &self,
        url: &str,
        realm: &str,
        realm_uri: &Uri,
    ) -> Result<Option<String>> {
        match &self.credentials()? {
            None => Ok(None),
            Some(creds) if realm_uri.scheme_str() == Some("https") => {
                Ok(Some(creds.basic_header()))
            }
            Some(creds)
                if self.scheme() == Some("http")
                    && realm_uri.host().is_some_and(|h| {
                        host_name(h).eq_ignore_ascii_case(host_name(&self.host))
                    }) =>
            {
                Ok(Some(creds.basic_header()))
            }
            Some(_) => Err(Error::Auth {
                url: url.to_string(),
                message: format!(
                    "token realm {realm} is plain HTTP on another host than the registry; \
                     credentials are not sent there"
                ),
            }),
        }
    }
}

/// How long before a token's stated expiry it is no longer sent: a
/// request made just before the end would arrive too late.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);

/// `Authorization` values by token scope, each until its token expires.
#[derive(Default)]
pub(super) struct TokenCache {
    entries: HashMap<String, (String, Option<Instant>)>,
}

impl TokenCache {
    /// Keeps `value` for `scope`, until `lifetime` from `now` (less a
    /// margin) when given, else for good (Basic credentials).
    pub(super) fn insert(
        &mut self,
        scope: &str,
        value: String,
        lifetime: Option<Duration>,
        now: Instant,
    ) {
        // A lifetime too long to add to an Instant never ends.
        let until =
            lifetime.and_then(|l| now.checked_add(l.saturating_sub(TOKEN_MARGIN.min(l / 2))));
        self.entries.insert(scope.to_string(), (value, until));
    }

    /// The value for `scope` at `now`, unless its token has expired.
    pub(super) fn get(&mut self, scope: &str, now: Instant) -> Option<String> {
        let (value, until) = self.entries.get(scope)?;
        if until.is_some_and(|t| now >= t) {
            self.entries.remove(scope);
            return None;
        }
        Some(value.clone())
    }

    pub(super) fn scopes(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
