//! How images are fetched: timeouts, concurrency, trust.

use std::path::PathBuf;
use std::time::Duration;

use crate::cache::DirPolicy;
use crate::mirrors::ConfSource;
use crate::tls::CertDirs;

/// Default bound on fetching one chunk, retries included.
pub const DEFAULT_CHUNK_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of requests in flight per registry host in one process.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

/// Settings for reaching registries.
#[derive(Clone, Debug)]
pub struct Options {
    /// Hosts (`name` or `name:port`) reached over plain HTTP although they
    /// are not loopback addresses.
    pub insecure_registries: Vec<String>,
    /// Bound on one chunk fetch or one manifest/config request, including
    /// waiting for a slot, retries and `Retry-After` waits (`ociblk`
    /// bounds the chunks of one guest read by it as a whole).
    pub chunk_timeout: Duration,
    /// Requests in flight per registry host in this process.
    pub max_in_flight: usize,
    /// The credentials file, read alone; `None` reads
    /// [`crate::credentials::default_auth_files`].
    pub auth_file: Option<PathBuf>,
    /// Which cache directories are accepted (`--allow-insecure-cache-dir`).
    pub cache_dir: DirPolicy,
    /// Where each registry's CA and client certificates are read from
    /// (`--cert-dir`).
    pub cert_dirs: CertDirs,
    /// The registries.conf files with mirrors, blocked and insecure
    /// registries (`--registries-conf`).
    pub registries_conf: ConfSource,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            insecure_registries: Vec::new(),
            chunk_timeout: DEFAULT_CHUNK_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            auth_file: None,
            cache_dir: DirPolicy::default(),
            cert_dirs: CertDirs::default(),
            registries_conf: ConfSource::default(),
        }
    }
}
