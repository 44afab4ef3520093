//! The places one image is fetched from: its mirrors in the order
//! registries.conf lists them, then the registry itself.
//!
//! A mirror that fails (unreachable, an error answer, or bytes that do not
//! match the digest or chunk hash pinned from the manifest) falls through
//! to the next source with one log line, and is passed over for
//! [`MIRROR_PAUSE`] after that. Nothing a mirror sends is trusted beyond
//! what it is checked against: tags (only where `pull-from-mirror` allows
//! resolving them there), manifests and configs by digest, chunks by their
//! hashes.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::client::RegistryClient;
use crate::error::{Error, Result};
use crate::mirrors::RegistriesConf;
use crate::options::Options;
use crate::reference::Reference;

/// How long a mirror that failed is passed over.
pub const MIRROR_PAUSE: Duration = Duration::from_secs(30);

/// One place to fetch from.
#[derive(Debug)]
pub struct Source {
    pub client: Arc<RegistryClient>,
    /// The image's reference at this place.
    pub reference: Reference,
    pub mirror: bool,
    /// Whether tags are resolved here.
    pub tags: bool,
    /// Until when a failed mirror is passed over.
    paused_until: Mutex<Option<Instant>>,
}

impl Source {
    pub fn repository(&self) -> &str {
        &self.reference.repository
    }

    fn paused(&self) -> bool {
        self.paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Passes the mirror over for a while; whether it was not paused yet.
    fn pause(&self) -> bool {
        let mut until = self
            .paused_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let was_paused = until.is_some_and(|u| Instant::now() < u);
        *until = Some(Instant::now() + MIRROR_PAUSE);
        !was_paused
    }
}

/// Every place one image is fetched from, mirrors first, the registry last.
#[derive(Debug)]
pub struct Sources {
    list: Vec<Source>,
}

impl Sources {
    /// The sources of `reference` as the registries.conf files `options`
    /// name describe them. Makes no request.
    pub fn open(reference: &Reference, options: &Options) -> Result<Sources> {
        let conf = RegistriesConf::load(&options.registries_conf)?;
        let endpoints = conf.endpoints(reference)?;
        let mut list = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let mut opts = options.clone();
            if endpoint.insecure {
                opts.insecure_registries
                    .push(endpoint.reference.host.clone());
            }
            let mut client = RegistryClient::new(&endpoint.reference, &opts)?;
            if endpoint.mirror {
                // A mirror that does not answer is passed over at once:
                // the registry behind it is the retry.
                client = client.with_connect_attempts(1);
            }
            list.push(Source {
                client: Arc::new(client),
                reference: endpoint.reference,
                mirror: endpoint.mirror,
                tags: endpoint.tags,
                paused_until: Mutex::new(None),
            });
        }
        Ok(Sources { list })
    }

    /// Only the registry `reference` names, with `client`.
    pub fn single(reference: &Reference, client: Arc<RegistryClient>) -> Sources {
        Sources {
            list: vec![Source {
                client,
                reference: reference.clone(),
                mirror: false,
                tags: true,
                paused_until: Mutex::new(None),
            }],
        }
    }

    /// The source tried first (a mirror, when there is one).
    pub fn first(&self) -> &Source {
        &self.list[0]
    }

    /// All sources, in the order they are tried.
    pub fn all(&self) -> &[Source] {
        &self.list
    }

    /// `fetch` from each source in turn until one succeeds: for a tag
    /// (`for_tag`) only sources tags are resolved at, else any. The
    /// registry itself comes last and its answer, success or error, is
    /// the result. An error of this host (the cache's file system) ends
    /// the turn at once: another source would not help.
    pub fn try_each<T>(
        &self,
        for_tag: bool,
        what: &str,
        mut fetch: impl FnMut(usize, &Source) -> Result<T>,
    ) -> Result<T> {
        let last = self.list.len() - 1;
        for (i, source) in self.list.iter().enumerate() {
            if i < last && ((for_tag && !source.tags) || source.paused()) {
                continue;
            }
            match fetch(i, source) {
                Ok(v) => return Ok(v),
                Err(e) if i == last || is_local(&e) => return Err(e),
                Err(e) => {
                    if source.pause() {
                        tracing::warn!(mirror = %source.reference, %e,
                            "mirror failed for {what}; using the next source (this mirror \
                             is passed over for {}s)", MIRROR_PAUSE.as_secs());
                    }
                }
            }
        }
        unreachable!("the registry itself is always tried last")
    }
}

/// Whether `e` is this host's own failure, not the source's.
fn is_local(e: &Error) -> bool {
    matches!(
        e,
        Error::Io { .. } | Error::Cache { .. } | Error::InsecureCacheDir { .. }
    )
}
