//! A guest's serial console: its output searched in order, one match after
//! the other, and its input typed line by line.

use std::io::{self, Write};
use std::process::ChildStdin;
use std::sync::Arc;
use std::time::Instant;

use super::log::{Search, Transcript};

/// Where a console search ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleSearch {
    /// The pattern appeared; `text` is the output from the end of the
    /// previous match to the end of this one, carriage returns dropped.
    Found { at: Instant, text: String },
    /// Not yet: the deadline passed first.
    NotYet,
    /// The output ended without the pattern (the guest is gone).
    Closed,
}

/// The console of one guest.
#[derive(Debug)]
pub struct Console {
    output: Arc<Transcript>,
    input: Option<ChildStdin>,
    /// Where the next search starts: the end of the previous match.
    cursor: usize,
    /// A pattern still being waited for and how far it was searched.
    scanned: Option<(String, usize)>,
}

impl Console {
    /// A console reading `output` (fed by [`follow`](super::log::follow))
    /// and typing into `input`.
    pub fn new(output: Arc<Transcript>, input: Option<ChildStdin>) -> Self {
        Console {
            output,
            input,
            cursor: 0,
            scanned: None,
        }
    }

    pub fn output(&self) -> &Arc<Transcript> {
        &self.output
    }

    /// Looks for `pattern` after the previous match, waiting until `until`.
    /// A later search for the same pattern resumes where this one stopped.
    pub fn search(&mut self, pattern: &str, until: Instant) -> ConsoleSearch {
        let resume = match &self.scanned {
            Some((p, scanned)) if p == pattern => *scanned,
            _ => self.cursor,
        };
        match self.output.search(pattern, self.cursor, resume, until) {
            Search::Found { end, at, text } => {
                self.cursor = end;
                self.scanned = None;
                ConsoleSearch::Found { at, text }
            }
            Search::TimedOut { scanned } => {
                self.scanned = Some((pattern.to_owned(), scanned));
                ConsoleSearch::NotYet
            }
            Search::Closed => ConsoleSearch::Closed,
        }
    }

    /// Types `line` and a newline.
    pub fn send(&mut self, line: &str) -> io::Result<()> {
        let input = self
            .input
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
        let mut data = Vec::with_capacity(line.len() + 1);
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
        input.write_all(&data)?;
        input.flush()
    }

    /// Closes the input, so that the guest never blocks on it.
    pub fn close_input(&mut self) {
        self.input = None;
    }
}
