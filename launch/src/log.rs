//! Copying a child's output to its log file, to the harness's stderr and to
//! an in-memory transcript that waits can search.
//!
//! One reader thread per child drains its pipe, so a child never blocks on
//! a full pipe however slowly the harness looks at the output.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Instant;

use tracing::warn;

/// Mode of a node's log files: a console shows what the guest prints, a
/// server's log the node's files; only our user reads them.
pub const LOG_MODE: u32 = 0o600;

/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 8192;
/// Output kept in memory per transcript; older output is only in the log file.
const TRANSCRIPT_LIMIT: usize = 4 << 20;
/// A partial line longer than this is echoed without waiting for its end.
const ECHO_LINE_LIMIT: usize = 4096;
/// Bytes looked at when quoting the end of a transcript.
const TAIL_BYTES: usize = 8192;

/// Everything a child printed, with the time each piece arrived.
#[derive(Debug, Default)]
pub struct Transcript {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The output kept in memory, carriage returns dropped (a serial
    /// console ends lines with "\r\n"; patterns then match either way).
    text: Vec<u8>,
    /// Offset of `text[0]` in the whole output.
    base: usize,
    /// End offset and arrival time of each chunk that is still in `text`.
    chunks: VecDeque<(usize, Instant)>,
    /// The child closed its end of the pipe: nothing more will come.
    closed: bool,
}

impl State {
    fn end(&self) -> usize {
        self.base + self.text.len()
    }

    /// Arrival time of the byte just before offset `end`.
    fn arrival(&self, end: usize) -> Instant {
        let i = self
            .chunks
            .partition_point(|&(chunk_end, _)| chunk_end < end);
        self.chunks
            .get(i)
            .or(self.chunks.back())
            .map_or_else(Instant::now, |&(_, at)| at)
    }

    /// Text from offset `from` (or the oldest byte kept) to `to`.
    fn text_between(&self, from: usize, to: usize) -> String {
        let start = from.max(self.base) - self.base;
        let end = to.max(self.base) - self.base;
        String::from_utf8_lossy(&self.text[start.min(end)..end]).into_owned()
    }
}

/// Where a search for a pattern ended.
#[derive(Debug)]
pub enum Search {
    Found {
        /// Offset just after the match.
        end: usize,
        /// When the end of the match arrived.
        at: Instant,
        /// The output from the search's start offset to `end`.
        text: String,
    },
    /// The output ended without the pattern.
    Closed,
    /// The deadline passed first; a search for the same pattern may
    /// resume at offset `scanned`.
    TimedOut { scanned: usize },
}

impl Transcript {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, data: &[u8]) {
        let mut state = self.lock();
        state
            .text
            .extend(data.iter().copied().filter(|&b| b != b'\r'));
        let end = state.end();
        state.chunks.push_back((end, Instant::now()));
        if state.text.len() > TRANSCRIPT_LIMIT {
            let drop = state.text.len() - TRANSCRIPT_LIMIT / 2;
            state.text.drain(..drop);
            state.base += drop;
            let base = state.base;
            while state.chunks.front().is_some_and(|&(end, _)| end <= base) {
                state.chunks.pop_front();
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Waits until the output is closed or `deadline` passes.
    pub fn wait_closed(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        loop {
            if state.closed {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until `pattern` appears at or after offset `from`, the output
    /// ends, or `deadline` passes. Bytes before `resume` (from an earlier
    /// search for the same pattern) are known not to hold a match.
    pub fn search(&self, pattern: &str, from: usize, resume: usize, deadline: Instant) -> Search {
        let pattern = pattern.as_bytes();
        let mut state = self.lock();
        // Where the next look starts: earlier bytes were searched already.
        let mut scan = resume.max(from);
        loop {
            let start = scan.max(state.base) - state.base;
            if let Some(i) = find(&state.text[start..], pattern) {
                let end = state.base + start + i + pattern.len();
                return Search::Found {
                    end,
                    at: state.arrival(end),
                    text: state.text_between(from, end),
                };
            }
            // A match may still end in bytes yet to come.
            scan = state
                .end()
                .saturating_sub(pattern.len().saturating_sub(1))
                .max(from);
            if state.closed {
                return Search::Closed;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Search::TimedOut { scanned: scan };
            };
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// All the output kept in memory (the last 2 to 4 MiB at least).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().text).into_owned()
    }

    /// The last `lines` lines of the output.
    pub fn tail(&self, lines: usize) -> String {
        let state = self.lock();
        let from = state.text.len().saturating_sub(TAIL_BYTES);
        let text = String::from_utf8_lossy(&state.text[from..]);
        let text = text.trim_end_matches('\n');
        let kept: Vec<&str> = text.rsplit('\n').take(lines).collect();
        kept.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// First position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Copies complete lines to stderr, each with a prefix.
struct LineEcho {
    prefix: String,
    partial: Vec<u8>,
}

impl LineEcho {
    fn push(&mut self, data: &[u8]) {
        let mut out = Vec::new();
        for &b in data {
            match b {
                b'\r' => {}
                b'\n' => self.take_line(&mut out),
                _ => {
                    self.partial.push(b);
                    if self.partial.len() >= ECHO_LINE_LIMIT {
                        self.take_line(&mut out);
                    }
                }
            }
        }
        write_stderr(&out);
    }

    fn finish(&mut self) {
        let mut out = Vec::new();
        if !self.partial.is_empty() {
            self.take_line(&mut out);
        }
        write_stderr(&out);
    }

    fn take_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.prefix.as_bytes());
        out.append(&mut self.partial);
        out.push(b'\n');
    }
}

fn write_stderr(out: &[u8]) {
    if !out.is_empty() {
        // A closed or full stderr must not stop the copy to the log file.
        let _ = io::stderr().lock().write_all(out);
    }
}

/// Creates (or empties) the log file at `path` with mode [`LOG_MODE`],
/// whatever the umask lets through; one an earlier launch left gets that
/// mode too. A symbolic link at `path` is refused, not followed.
pub fn create_log_file(path: &Path) -> io::Result<File> {
    open_log_file(path, false)
}

/// [`create_log_file`], or with `append` the log file at `path` opened
/// for appending (created if missing), with the same mode.
pub fn open_log_file(path: &Path, append: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options
        .create(true)
        .mode(LOG_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if append {
        options.append(true);
    } else {
        options.write(true).truncate(true);
    }
    let file = options.open(path)?;
    file.set_permissions(fs::Permissions::from_mode(LOG_MODE))?;
    Ok(file)
}

/// Starts a thread that copies `source` to `file` (if given), to
/// `transcript` and, if `echo_prefix` is given, line by line to stderr,
/// until end of file.
pub fn follow(
    thread_name: String,
    mut source: impl Read + Send + 'static,
    mut file: Option<File>,
    echo_prefix: Option<String>,
    transcript: std::sync::Arc<Transcript>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(thread_name).spawn(move || {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut echo = echo_prefix.map(|prefix| LineEcho {
            prefix,
            partial: Vec::new(),
        });
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("reading a child's output: {e}");
                    break;
                }
            };
            let data = &buf[..n];
            if let Some(f) = &mut file
                && let Err(e) = f.write_all(data)
            {
                // Keep draining the pipe: the child must not block.
                warn!("writing a log file: {e}");
                file = None;
            }
            if let Some(echo) = &mut echo {
                echo.push(data);
            }
            transcript.push(data);
        }
        if let Some(echo) = &mut echo {
            echo.finish();
        }
        transcript.close();
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn log_files_are_private_new_or_left_by_an_earlier_launch() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("console.log");
        create_log_file(&new).unwrap();
        let old = dir.path().join("serve.log");
        fs::write(&old, b"an earlier launch").unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o644)).unwrap();
        create_log_file(&old).unwrap();
        for path in [&new, &old] {
            let meta = fs::metadata(path).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, LOG_MODE);
            assert_eq!(meta.len(), 0);
        }
        // A restarted server's log is appended to, and private too.
        fs::write(&old, b"first server\n").unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o644)).unwrap();
        let mut appended = open_log_file(&old, true).unwrap();
        appended.write_all(b"second server\n").unwrap();
        assert_eq!(fs::read(&old).unwrap(), b"first server\nsecond server\n");
        assert_eq!(
            fs::metadata(&old).unwrap().permissions().mode() & 0o777,
            LOG_MODE
        );
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&old, &link).unwrap();
        create_log_file(&link).unwrap_err();
        open_log_file(&link, true).unwrap_err();
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[test]
    fn search_spans_chunks_and_drops_carriage_returns() {
        let t = Transcript::default();
        t.push(b"boot\r\nociblk-sam");
        t.push(b"ple: ready\r\n~ # ");
        let Search::Found { end, text, .. } = t.search("ociblk-sample: ready\n", 0, 0, deadline())
        else {
            panic!("not found");
        };
        assert_eq!(text, "boot\nociblk-sample: ready\n");
        // The next search starts after the match.
        let Search::TimedOut { scanned } = t.search("ready", end, 0, deadline()) else {
            panic!("found twice");
        };
        // Resuming skips what was searched, but still finds a match that
        // straddles the old end.
        assert_eq!(scanned, t.lock().end() - "ready".len() + 1);
        t.push(b"rea");
        t.push(b"dy!");
        assert!(matches!(
            t.search("ready", end, scanned, deadline()),
            Search::Found { .. }
        ));
        t.close();
        assert!(matches!(
            t.search("nothing", end, 0, deadline()),
            Search::Closed
        ));
        assert_eq!(t.tail(2), "ociblk-sample: ready\n~ # ready!");
    }

    #[test]
    fn arrival_time_is_that_of_the_chunk_ending_the_match() {
        let t = Transcript::default();
        t.push(b"abc");
        std::thread::sleep(Duration::from_millis(20));
        let before = Instant::now();
        t.push(b"def");
        let Search::Found { at, .. } = t.search("cd", 0, 0, deadline()) else {
            panic!("not found");
        };
        assert!(at >= before);
        let Search::Found { at, .. } = t.search("ab", 0, 0, deadline()) else {
            panic!("not found");
        };
        assert!(at < before);
    }

    #[test]
    fn memory_is_bounded_and_offsets_stay_absolute() {
        let t = Transcript::default();
        let block = vec![b'x'; TRANSCRIPT_LIMIT / 4];
        for _ in 0..8 {
            t.push(&block);
        }
        t.push(b"tail-marker");
        let Search::Found { end, .. } = t.search("tail-marker", 0, 0, deadline()) else {
            panic!("not found");
        };
        assert_eq!(end, 2 * TRANSCRIPT_LIMIT + "tail-marker".len());
        assert!(t.lock().text.len() <= TRANSCRIPT_LIMIT);
    }
}
