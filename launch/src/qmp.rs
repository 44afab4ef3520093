//! A minimal QMP client: one JSON object per line over QEMU's monitor
//! socket (`-qmp unix:PATH,server=on,wait=off`), every exchange bounded in
//! time. Enough to drive a migration: `migrate`, `query-migrate`,
//! `migrate-set-parameters`, `stop`, `cont`, `quit`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Errors of a QMP session.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("QMP socket {}: {what}", path.display())]
    Protocol { path: PathBuf, what: String },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Asynchronous events received so far (`{"event": ...}` objects).
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying until it exists and
    /// accepts, for at most `timeout`), reads the greeting and enters
    /// command mode. Every later read waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let io_err = |source| QmpError::Io {
            path: path.to_owned(),
            source,
        };
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io_err(e)),
            }
        };
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let reader = BufReader::new(stream.try_clone().map_err(io_err)?);
        let mut qmp = Qmp {
            path: path.to_owned(),
            writer: stream,
            reader,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            if message.get("event").is_some() {
                self.events.push(message);
                continue;
            }
            return Err(self.protocol(format!("unexpected message {message}")));
        }
    }

    /// The events received so far, oldest first.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(self.protocol("QEMU closed the connection".to_owned()));
        }
        serde_json::from_str(&line)
            .map_err(|e| self.protocol(format!("not JSON ({e}): {}", line.trim_end())))
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            what,
        }
    }
}

/// Where a migration stands, from `query-migrate`.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationStatus {
    /// `status`: `setup`, `active`, `completed`, `failed`, ...
    pub status: String,
    /// `ram.dirty-sync-count`: how many times the dirty bitmap was synced;
    /// from 2 on, every page has been sent at least once.
    pub dirty_sync_count: u64,
    /// `total-time` in ms (when completed).
    pub total_time_ms: Option<u64>,
    /// `downtime` in ms (when completed).
    pub downtime_ms: Option<u64>,
    /// `setup-time` in ms.
    pub setup_time_ms: Option<u64>,
    /// `error-desc` (when failed).
    pub error: Option<String>,
    /// The whole answer.
    pub raw: Value,
}

impl Qmp {
    /// `query-migrate`, decoded.
    pub fn query_migrate(&mut self) -> Result<MigrationStatus, QmpError> {
        let raw = self.execute("query-migrate", None)?;
        let u64_at = |v: &Value, key: &str| v.get(key).and_then(Value::as_u64);
        Ok(MigrationStatus {
            status: raw
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_owned(),
            dirty_sync_count: raw
                .get("ram")
                .and_then(|ram| u64_at(ram, "dirty-sync-count"))
                .unwrap_or(0),
            total_time_ms: u64_at(&raw, "total-time"),
            downtime_ms: u64_at(&raw, "downtime"),
            setup_time_ms: u64_at(&raw, "setup-time"),
            error: raw
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_owned),
            raw,
        })
    }
}
