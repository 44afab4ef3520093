//! Child processes for end-to-end tests: an `ociblk serve` backend and a
//! QEMU guest with a console the test can read and type into. Every wait has
//! a deadline; every child is ended by its PID when its guard drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{ociblk_bin, require_tool, sample_image, workspace_root};

/// Polls `cond` every 2 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn signal(child: &Child, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) on the PID of a child we own and have not reaped yet.
    unsafe { libc::kill(pid, sig) };
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    status
}

/// Collects a child's output lines in the background.
#[derive(Debug, Clone, Default)]
pub struct OutputLog(Arc<Mutex<String>>);

impl OutputLog {
    fn follow(&self, stream: impl Read + Send + 'static, prefix: &'static str) {
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("OCIBLK_TEST_VERBOSE").is_some() {
                    eprintln!("{prefix}{line}");
                }
                if let Ok(mut s) = log.0.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// An `ociblk serve` process. Dropping it sends SIGKILL.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub log: OutputLog,
}

impl Server {
    /// Starts `ociblk serve` with `args` (plus `--socket`) and waits until
    /// the socket accepts connections.
    pub fn start(socket: &Path, args: &[&str]) -> Server {
        let mut cmd = Command::new(ociblk_bin());
        cmd.arg("serve").arg("--socket").arg(socket).args(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.env("OCIBLK_LOG", "info");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let log = OutputLog::default();
        if let Some(out) = child.stdout.take() {
            log.follow(out, "[ociblk] ");
        }
        if let Some(err) = child.stderr.take() {
            log.follow(err, "[ociblk] ");
        }
        let mut server = Server {
            child,
            socket: socket.to_path_buf(),
            log,
        };
        server.wait_ready(Duration::from_secs(20));
        server
    }

    /// Waits until the socket exists (a probe connection would take the
    /// server's one connection slot, so existence is what is checked).
    pub fn wait_ready(&mut self, timeout: Duration) {
        let ok = wait_until(timeout, || {
            self.socket.exists() || self.child.try_wait().ok().flatten().is_some()
        });
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("ociblk serve exited with {status}:\n{}", self.log.text());
        }
        assert!(
            ok,
            "ociblk serve did not create {} in time:\n{}",
            self.socket.display(),
            self.log.text()
        );
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> ExitStatus {
        signal(&self.child, sig);
        wait_exit(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "ociblk serve did not exit after signal {sig}:\n{}",
                self.log.text()
            )
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(&self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// How the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads the sample kernel and initramfs directly.
    DirectKernel,
    /// OVMF firmware boots the ESP's `EFI/BOOT/BOOTx64.EFI`.
    Uefi,
}

/// A QEMU guest whose only disk is a vhost-user-blk device.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Receiver<u8>,
    /// Everything the console printed so far, carriage returns dropped.
    pub transcript: String,
    /// Where the next `expect` starts searching.
    cursor: usize,
    marker: u64,
}

/// QEMU options for a guest on `socket`.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub socket: PathBuf,
    pub boot: Boot,
    pub queues: u16,
    pub memory_mib: u32,
    /// Extra kernel arguments for direct kernel boot.
    pub append: String,
    /// Let QEMU reconnect to a restarted backend.
    pub reconnect: bool,
    pub vars: Option<PathBuf>,
}

impl GuestConfig {
    pub fn new(socket: &Path, boot: Boot) -> Self {
        GuestConfig {
            socket: socket.to_path_buf(),
            boot,
            queues: 2,
            memory_mib: 512,
            append: String::new(),
            reconnect: false,
            vars: None,
        }
    }
}

impl Guest {
    pub fn start(cfg: &GuestConfig) -> Guest {
        let qemu = require_tool("qemu-system-x86_64");
        let mut cmd = Command::new(qemu);
        let mem = format!("{}M", cfg.memory_mib);
        let reconnect = if cfg.reconnect { ",reconnect=1" } else { "" };
        cmd.args(["-accel", "tcg", "-smp", "2", "-m", &mem])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            ])
            .args(["-machine", "q35,memory-backend=mem"])
            .args([
                "-chardev",
                &format!("socket,id=disk0,path={}{reconnect}", cfg.socket.display()),
            ])
            .args([
                "-device",
                &format!(
                    "vhost-user-blk-pci,chardev=disk0,num-queues={},disable-legacy=on,bootindex=1",
                    cfg.queues
                ),
            ])
            .args([
                "-display",
                "none",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-nodefaults",
            ]);
        match cfg.boot {
            Boot::DirectKernel => {
                let guest = workspace_root().join("build/sample-guest");
                sample_image();
                cmd.arg("-kernel")
                    .arg(guest.join("vmlinuz"))
                    .arg("-initrd")
                    .arg(guest.join("initramfs.cpio.gz"))
                    .arg("-append")
                    .arg(format!("console=ttyS0 panic=-1 {}", cfg.append));
            }
            Boot::Uefi => {
                let code = Path::new("/usr/share/OVMF/OVMF_CODE.fd");
                let vars = cfg
                    .vars
                    .clone()
                    .expect("UEFI boot needs a writable OVMF_VARS copy");
                assert!(code.exists(), "OVMF is not installed: run hack/setup");
                cmd.args([
                    "-drive",
                    &format!("if=pflash,format=raw,readonly=on,file={}", code.display()),
                ])
                .args([
                    "-drive",
                    &format!("if=pflash,format=raw,file={}", vars.display()),
                ]);
            }
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let (tx, rx) = channel();
        if let Some(mut out) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 || buf[..n].iter().any(|&b| tx.send(b).is_err()) {
                        break;
                    }
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 || buf[..n].iter().any(|&b| tx.send(b).is_err()) {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Guest {
            child,
            stdin,
            console: rx,
            transcript: String::new(),
            cursor: 0,
            marker: 0,
        }
    }

    /// Reads console output until `pattern` appears (after what was
    /// already matched) or `timeout` passes; returns the text up to it.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> String {
        let start = self.cursor;
        let deadline = Instant::now() + timeout;
        let mut pending = Vec::new();
        loop {
            if let Some(i) = self.transcript[start..].find(pattern) {
                let end = start + i + pattern.len();
                self.cursor = end;
                return self.transcript[start..end].to_owned();
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "guest console did not show {pattern:?} within {timeout:?}:\n{}",
                    self.tail()
                );
            }
            match self.console.recv_timeout(deadline - now) {
                Ok(b) => {
                    pending.push(b);
                    while let Ok(b) = self.console.try_recv() {
                        pending.push(b);
                    }
                    // The serial tty ends lines with "\r\n"; keep only "\n" so
                    // that patterns (and `run`'s marker) match either way.
                    let text = String::from_utf8_lossy(&pending).replace('\r', "");
                    self.transcript.push_str(&text);
                    if std::env::var_os("OCIBLK_TEST_VERBOSE").is_some() {
                        eprint!("{}", String::from_utf8_lossy(&pending));
                    }
                    pending.clear();
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "QEMU exited before the console showed {pattern:?}:\n{}",
                        self.tail()
                    );
                }
            }
        }
    }

    fn tail(&self) -> String {
        let t = &self.transcript;
        let from = t.len().saturating_sub(6000);
        let from = (from..t.len())
            .find(|&i| t.is_char_boundary(i))
            .unwrap_or(t.len());
        t[from..].to_owned()
    }

    /// Types `line` into the console.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("guest stdin");
        stdin
            .write_all(line.as_bytes())
            .expect("write to guest console");
        stdin.write_all(b"\n").expect("write to guest console");
        stdin.flush().expect("flush guest console");
    }

    /// Runs a shell command in the guest and returns (exit status, output).
    pub fn run(&mut self, command: &str, timeout: Duration) -> (i32, String) {
        self.marker += 1;
        let m = self.marker;
        // The marker printed differs from the one typed (arithmetic), so the
        // terminal's echo of the command cannot match.
        self.send(&format!("{command}; echo \"@@done-{m} $?@@ $(({m}*7))\""));
        let out = self.expect(&format!(" {}\n", m * 7), timeout);
        let start = format!("@@done-{m} ");
        let tail = out
            .rfind(&start)
            .map(|i| &out[i + start.len()..])
            .unwrap_or_default();
        let status = tail
            .split("@@")
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1);
        let body_end = out.rfind(&start).unwrap_or(out.len());
        // Drop the echoed command line (the first line) from the output.
        let body = out[..body_end]
            .split_once('\n')
            .map(|(_, b)| b)
            .unwrap_or_default();
        (status, body.replace('\r', ""))
    }

    /// Runs a command that must succeed and returns its output.
    pub fn run_ok(&mut self, command: &str, timeout: Duration) -> String {
        let (status, out) = self.run(command, timeout);
        assert_eq!(
            status, 0,
            "guest command {command:?} failed with {status}:\n{out}"
        );
        out
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_exit(&mut self.child, timeout)
            .unwrap_or_else(|| panic!("QEMU did not exit within {timeout:?}:\n{}", self.tail()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ends QEMU by its PID (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(&self.child, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Unix socket at `path` accepts a connection right now.
pub fn socket_accepts(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}
