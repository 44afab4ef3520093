//! Fetching one chunk of a blob with an HTTP range request.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ureq::http::StatusCode;

use crate::cache::BlobSpec;
use crate::client::RegistryClient;
use crate::error::{Error, Result};
use crate::limiter::{Permit, Priority};
use crate::sources::{Source, Sources};

/// Where the blobs of one image are fetched from: its mirrors, then its
/// registry (see [`Sources`]).
#[derive(Clone, Debug)]
pub struct BlobSource {
    sources: Arc<Sources>,
    stats: Arc<Counters>,
}

/// One chunk to fetch: chunk `index` of `blob`, before `deadline`, with
/// request slots taken at `priority`.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRequest<'a> {
    pub blob: &'a BlobSpec,
    pub index: u64,
    pub deadline: Instant,
    pub priority: Priority,
}

/// What a [`BlobSource`] has fetched so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Blob requests answered with bytes (206 or 200).
    pub requests: u64,
    /// Body bytes read from those answers.
    pub bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
}

impl BlobSource {
    pub fn new(sources: Arc<Sources>) -> Self {
        BlobSource {
            sources,
            stats: Arc::default(),
        }
    }

    /// Requests and bytes fetched through this source (and its clones).
    pub fn stats(&self) -> FetchStats {
        FetchStats {
            requests: self.stats.requests.load(Ordering::Relaxed),
            bytes: self.stats.bytes.load(Ordering::Relaxed),
        }
    }

    fn count(&self, bytes: u64) {
        self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The client of the source tried first: its timeout bounds a fetch,
    /// and a prefetch's first request slot is taken from it.
    pub fn client(&self) -> &RegistryClient {
        &self.sources.first().client
    }

    /// Fetches `chunk` and hands it to `store`, taking request slots at
    /// its priority (the first one is `held` if given), from the first
    /// source that delivers bytes `store` accepts.
    pub fn fetch_chunk(
        &self,
        chunk: ChunkRequest,
        held: Option<Permit>,
        store: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut held = held;
        let what = format!("blob {} chunk {}", chunk.blob.digest, chunk.index);
        self.sources.try_each(false, &what, |i, source| {
            // The slot held was taken from the first source's host.
            let permit = held.take().filter(|_| i == 0);
            self.fetch_chunk_from(source, chunk, permit, store)
        })
    }

    /// [`BlobSource::fetch_chunk`] from one source.
    ///
    /// Asks for exactly the chunk's bytes. A registry that ignores `Range`
    /// answers 200 with the whole blob: then every chunk up to the one
    /// asked for is read and handed to `store` in order (so the bytes that
    /// arrive are not wasted), and the rest of the body is dropped.
    fn fetch_chunk_from(
        &self,
        source: &Source,
        chunk: ChunkRequest,
        held: Option<Permit>,
        store: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let ChunkRequest {
            blob,
            index,
            deadline,
            priority,
        } = chunk;
        let client = &source.client;
        let (start, len) = blob.chunk_range(index);
        let end = start + len - 1;
        let range = format!("bytes={start}-{end}");
        let fetched = client.get_as(
            source.repository(),
            &format!("blobs/{}", blob.digest),
            &[("Range", &range)],
            deadline,
            priority,
            held,
        )?;
        let url = fetched.url.clone();
        let mut response = fetched.response;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let protocol = |message: String| Error::Protocol {
            url: url.clone(),
            message,
        };
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = header("content-range").unwrap_or_default();
                let expected = format!("bytes {start}-{end}/");
                let total_ok = content_range
                    .strip_prefix(&expected)
                    .is_some_and(|t| t == "*" || t == blob.size().to_string());
                if !total_ok {
                    return Err(protocol(format!(
                        "asked for {range} of a {}-byte blob, got Content-Range {content_range:?}",
                        blob.size()
                    )));
                }
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0; len as usize];
                let mut reader = response.body_mut().as_reader();
                read_exact(&mut reader, &mut buf, &url, client.timeout())?;
                self.count(len);
                finish_body(&mut reader, &url);
                store(index, &buf)
            }
            StatusCode::OK => {
                if let Some(length) = header("content-length")
                    && length != blob.size().to_string()
                {
                    return Err(protocol(format!(
                        "whole blob answer has Content-Length {length}, the blob has {} bytes",
                        blob.size()
                    )));
                }
                tracing::debug!(%url, "registry ignored Range; reading the blob from its start");
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let mut reader = response.body_mut().as_reader();
                let mut buf = Vec::new();
                for i in 0..=index {
                    let (_, len) = blob.chunk_range(i);
                    buf.resize(len as usize, 0);
                    read_exact(&mut reader, &mut buf, &url, client.timeout())?;
                    self.count(len);
                    store(i, &buf)?;
                }
                Ok(())
            }
            StatusCode::NOT_FOUND => Err(Error::Status {
                url,
                status: 404,
                detail: "the registry does not have this blob".into(),
            }),
            other => Err(Error::Status {
                url,
                status: other.as_u16(),
                detail: format!("for {range}"),
            }),
        }
    }
}

/// Reads a response body on to its end, which must come at once: only a
/// body read to its end hands its connection back to the client's pool,
/// and a chunk fetched without it costs a new connection (a round trip
/// more over a network) for the next one. Bytes past what was asked for
/// are a broken answer, but the chunk read is complete and its hash is
/// what judges it: the connection is then simply not reused.
fn finish_body(reader: &mut impl io::Read, url: &str) {
    let mut rest = [0u8; 1];
    match reader.read(&mut rest) {
        Ok(0) => {}
        Ok(_) => tracing::debug!(url, "the response goes on past the range asked for"),
        Err(e) => tracing::debug!(url, "the end of the response: {e}"),
    }
}

fn read_exact(
    reader: &mut impl io::Read,
    buf: &mut [u8],
    url: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    reader.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            Error::Timeout {
                url: url.to_string(),
                timeout,
                last: "reading the body".into(),
            }
        } else {
            Error::Protocol {
                url: url.to_string(),
                message: format!("reading the body: {e}"),
            }
        }
    })
}
