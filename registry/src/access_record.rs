//! Access records: the order in which a guest first read an image's
//! payload chunks, written by `ociblk serve --record-access` and replayed
//! by `--prefetch`.
//!
//! A record is UTF-8 text, one item per line, each line ending in `\n`:
//!
//! ```text
//! ociblk-access-record 1
//! manifest sha256:<64 hex>
//! # lines starting with '#' are comments
//! sha256:<64 hex of a payload blob> <chunk index>
//! ...
//! ```
//!
//! The first line names the format and its version, the second the
//! manifest digest of the image the record belongs to; every further line
//! is a chunk of a payload blob (chunk indexes count chunks of the image's
//! `hash_chunk_size`, decimal, no leading zeros), each chunk at most once,
//! in the order it was first read. A record comes from wherever the user
//! copied it from, so it is parsed strictly and its size is bounded.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The first line of every record (the version is the number after it).
pub const MAGIC: &str = "ociblk-access-record";
/// The version written and read.
pub const VERSION: u32 = 1;
/// Largest record accepted, in bytes: some 200,000 chunks.
pub const SIZE_LIMIT: u64 = 16 << 20;

/// One payload chunk.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub blob: Digest,
    pub index: u64,
}

/// A chunk as listed in a record, with the line it is on (1-based), for
/// errors about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedChunk {
    pub chunk: ChunkRef,
    pub line: usize,
}

/// The chunks of one image in the order a guest first read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRecord {
    /// The manifest digest of the image the record was made for.
    pub manifest: Digest,
    pub chunks: Vec<RecordedChunk>,
}

/// Why the text of a record was refused: the line (1-based) and what is
/// wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl AccessRecord {
    /// A record of `chunks` in this order (repeats dropped) for the image
    /// with manifest digest `manifest`.
    pub fn new(manifest: Digest, chunks: impl IntoIterator<Item = ChunkRef>) -> Self {
        let mut seen = std::collections::HashSet::new();
        let chunks = chunks
            .into_iter()
            .filter(|c| seen.insert(c.clone()))
            .enumerate()
            // Lines as `to_text` writes them: two header lines and a comment first.
            .map(|(i, chunk)| RecordedChunk { chunk, line: i + 4 })
            .collect();
        AccessRecord { manifest, chunks }
    }

    /// Parses a record's bytes (see the module documentation).
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let err = |line: usize, message: String| ParseError { line, message };
        if bytes.len() as u64 > SIZE_LIMIT {
            return Err(err(
                1,
                format!(
                    "{} bytes, more than the {SIZE_LIMIT} a record may have",
                    bytes.len()
                ),
            ));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            // The bytes before the first bad one are valid UTF-8.
            let line = 1 + String::from_utf8_lossy(&bytes[..e.valid_up_to()])
                .matches('\n')
                .count();
            err(line, "not UTF-8 text".into())
        })?;
        if !text.is_empty() && !text.ends_with('\n') {
            let line = text.split('\n').count();
            return Err(err(
                line,
                "the last line does not end with a newline".into(),
            ));
        }
        let mut lines = text
            .split_terminator('\n')
            .enumerate()
            .map(|(i, l)| (i + 1, l));
        let header = format!("{MAGIC} {VERSION}");
        match lines.next() {
            Some((_, l)) if l == header => {}
            Some((_, l)) if l.starts_with(MAGIC) => {
                return Err(err(
                    1,
                    format!("{l:?}: unknown version (this ociblk reads {header:?})"),
                ));
            }
            _ => return Err(err(1, format!("not an access record (want {header:?})"))),
        }
        let manifest = match lines.next() {
            Some((n, l)) => {
                let value = l
                    .strip_prefix("manifest ")
                    .ok_or_else(|| err(n, format!("{l:?}: want \"manifest sha256:<hex>\"")))?;
                value
                    .parse::<Digest>()
                    .map_err(|e| err(n, format!("manifest: {e}")))?
            }
            None => return Err(err(2, "missing the manifest line".into())),
        };
        let mut first_seen: HashMap<ChunkRef, usize> = HashMap::new();
        let mut chunks = Vec::new();
        for (n, l) in lines {
            if l.starts_with('#') {
                continue;
            }
            let (blob, index) = l
                .split_once(' ')
                .ok_or_else(|| err(n, format!("{l:?}: want \"sha256:<hex> <chunk index>\"")))?;
            let blob = blob
                .parse::<Digest>()
                .map_err(|e| err(n, format!("blob: {e}")))?;
            let index = parse_index(index).ok_or_else(|| {
                err(
                    n,
                    format!("chunk index {index:?} is not a decimal number without leading zeros"),
                )
            })?;
            let chunk = ChunkRef { blob, index };
            if let Some(first) = first_seen.insert(chunk.clone(), n) {
                return Err(err(
                    n,
                    format!(
                        "chunk {} of {} is listed already on line {first}",
                        chunk.index, chunk.blob
                    ),
                ));
            }
            chunks.push(RecordedChunk { chunk, line: n });
        }
        Ok(AccessRecord { manifest, chunks })
    }

    /// The record as text, as [`AccessRecord::parse`] reads it.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{MAGIC} {VERSION}\nmanifest {}\n# payload chunks in the order they were first read\n",
            self.manifest
        );
        for c in &self.chunks {
            out.push_str(&format!("{} {}\n", c.chunk.blob, c.chunk.index));
        }
        out
    }

    /// Reads and parses the record in `path`, reading at most
    /// [`SIZE_LIMIT`] bytes; errors name the file and line. Anything but a
    /// regular file (a FIFO, a device) is refused without waiting on it.
    pub fn read(path: &Path) -> Result<Self> {
        let file = crate::cache::file::open_following(path).map_err(|e| Error::io(path, e))?;
        let mut bytes = Vec::new();
        file.take(SIZE_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        AccessRecord::parse(&bytes).map_err(|e| Error::AccessRecord {
            path: path.to_path_buf(),
            line: e.line,
            message: e.message,
        })
    }

    /// Writes the record to `path` atomically (a private temporary file in
    /// the same directory, renamed into place): mode 0600.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::cache::write_atomic(path, self.to_text().as_bytes())
    }
}

/// A chunk index: decimal digits, no sign, no leading zero (but `0`).
fn parse_index(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical { s.parse().ok() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(byte: u8) -> Digest {
        Digest::from_sha256(&[byte; 32])
    }

    fn chunk(blob: u8, index: u64) -> ChunkRef {
        ChunkRef {
            blob: d(blob),
            index,
        }
    }

    fn refused(text: &str) -> ParseError {
        AccessRecord::parse(text.as_bytes()).expect_err(text)
    }

    fn header() -> String {
        format!("ociblk-access-record 1\nmanifest {}\n", d(9))
    }

    #[test]
    fn written_records_read_back_in_order_without_repeats() {
        let r = AccessRecord::new(d(9), [chunk(1, 3), chunk(2, 0), chunk(1, 3), chunk(1, 0)]);
        let order: Vec<_> = r.chunks.iter().map(|c| c.chunk.clone()).collect();
        assert_eq!(order, [chunk(1, 3), chunk(2, 0), chunk(1, 0)]);
        let text = r.to_text();
        assert!(text.starts_with("ociblk-access-record 1\nmanifest sha256:0909"));
        let back = AccessRecord::parse(text.as_bytes()).expect("parse");
        assert_eq!(back.manifest, d(9));
        let order_back: Vec<_> = back.chunks.iter().map(|c| c.chunk.clone()).collect();
        assert_eq!(order_back, order);
        // Lines as the file has them, past the header and the comment.
        assert_eq!(back.chunks[0].line, 4);
        let empty = AccessRecord::new(d(9), []);
        assert_eq!(
            AccessRecord::parse(empty.to_text().as_bytes()).expect("empty"),
            empty
        );
    }

    #[test]
    fn bad_records_name_the_line_and_what_is_wrong() {
        let h = header();
        let b = d(1);
        let cases: &[(String, usize, &str)] = &[
            (String::new(), 1, "not an access record"),
            ("ociblk-access-record 2\n".into(), 1, "unknown version"),
            ("hello\n".into(), 1, "not an access record"),
            ("ociblk-access-record 1\n".into(), 2, "missing the manifest"),
            (
                "ociblk-access-record 1\nmanifest sha256:12\n".into(),
                2,
                "manifest: \"sha256:12\" is not a sha256 digest",
            ),
            (
                "ociblk-access-record 1\nimage x\n".into(),
                2,
                "want \"manifest",
            ),
            (format!("{h}{b} 1"), 3, "does not end with a newline"),
            (
                format!("{h}{b}\n"),
                3,
                "want \"sha256:<hex> <chunk index>\"",
            ),
            (format!("{h}{b} 01\n"), 3, "chunk index \"01\""),
            (format!("{h}{b} -1\n"), 3, "chunk index \"-1\""),
            (format!("{h}{b}  1\n"), 3, "chunk index \" 1\""),
            (format!("{h}{b} 99999999999999999999\n"), 3, "chunk index"),
            (format!("{h}sha256:AB 1\n"), 3, "blob: \"sha256:AB\""),
            (
                format!("{h}{b} 1\n# c\n{b} 1\n"),
                5,
                "listed already on line 3",
            ),
            (format!("{h}{b} 1\r\n"), 3, "chunk index \"1\\r\""),
            (format!("{h}\n"), 3, "want \"sha256:<hex> <chunk index>\""),
        ];
        for (text, line, needle) in cases {
            let e = refused(text);
            assert_eq!(e.line, *line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
        let mut bytes = h.into_bytes();
        bytes.extend_from_slice(b"\xff\n");
        let e = AccessRecord::parse(&bytes).expect_err("not utf-8");
        assert_eq!((e.line, e.message.as_str()), (3, "not UTF-8 text"));
        let big = vec![b'#'; SIZE_LIMIT as usize + 1];
        assert!(refused_bytes(&big).message.contains("more than"));
    }

    /// Every one-byte change or deletion of a small record: a refusal names
    /// a line of the input, an accepted record writes back to itself.
    #[test]
    fn single_byte_changes_are_refused_on_a_line_of_the_input_or_round_trip() {
        let good = AccessRecord::new(d(9), [chunk(1, 10), chunk(2, 0)]).to_text();
        let mut accepted = 0;
        for at in 0..good.len() {
            for with in [
                None,
                Some(b' '),
                Some(b'\n'),
                Some(b'0'),
                Some(b'#'),
                Some(0xff),
            ] {
                let mut bytes = good.as_bytes().to_vec();
                match with {
                    Some(b) => bytes[at] = b,
                    None => {
                        bytes.remove(at);
                    }
                }
                let lines = bytes.split(|&b| b == b'\n').count();
                match AccessRecord::parse(&bytes) {
                    Ok(r) => {
                        accepted += 1;
                        let again = AccessRecord::parse(r.to_text().as_bytes()).expect("written");
                        assert_eq!(again.manifest, r.manifest);
                        assert_eq!(again.chunks.len(), r.chunks.len());
                    }
                    Err(e) => assert!((1..=lines).contains(&e.line), "{e} of {lines} lines"),
                }
            }
        }
        // Some changes keep a valid record (a digit of an index, the comment).
        assert!(accepted > 0);
    }

    fn refused_bytes(bytes: &[u8]) -> ParseError {
        AccessRecord::parse(bytes).expect_err("refused")
    }

    #[test]
    fn files_are_private_and_errors_name_them() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("boot.access");
        let r = AccessRecord::new(d(9), [chunk(1, 0)]);
        r.write(&path).expect("write");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(AccessRecord::read(&path).expect("read"), r);
        std::fs::write(&path, format!("{}x 1\n", header())).expect("damage");
        let e = AccessRecord::read(&path).expect_err("bad").to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("line 3"),
            "{e}"
        );
    }
}
