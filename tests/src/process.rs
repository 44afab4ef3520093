//! Child processes of end-to-end tests, on the launch harness's own
//! [`Process`] (ended by PID only, reaped on drop) and [`Transcript`]:
//! an `ociblk serve` backend, a QEMU guest with a console the test reads and
//! types into, and QEMU's `qemu-storage-daemon` as a reference backend.
//! Every wait has a deadline.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ociblk_client::{ClientOptions, VhostBlkClient};
use ociblk_launch::console::{Console, ConsoleSearch};
use ociblk_launch::log::{Transcript, follow};
use ociblk_launch::process::Process;
use ociblk_launch::{DEFAULT_OVMF_CODE, QemuBoot, QemuCommand, QemuDisk, Reconnect, qemu_version};

use crate::support::{ociblk_bin, require_tool, sample_guest, verbose, wait_until};

/// Lines of a console quoted when a wait fails.
const TAIL_LINES: usize = 80;

/// Spawns `cmd` with its stdout and stderr into one transcript (echoed to
/// stderr under `OCIBLK_TEST_VERBOSE`, lines prefixed with `echo`).
fn spawn_followed(cmd: &mut Command, echo: &str) -> (Process, Arc<Transcript>) {
    let (output, writer) = std::io::pipe().expect("pipe");
    cmd.stdout(writer.try_clone().expect("pipe")).stderr(writer);
    let mut process = Process::spawn(cmd, libc::SIGKILL, None)
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // The pipe's write ends in `cmd` must go, or the output never ends.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let log = Arc::new(Transcript::default());
    let echo = verbose().then(|| echo.to_owned());
    follow(
        format!("output-{}", process.pid()),
        output,
        None,
        echo,
        Arc::clone(&log),
    )
    .unwrap_or_else(|e| {
        process.kill();
        panic!("cannot follow the output of {cmd:?}: {e}")
    });
    (process, log)
}

/// An `ociblk serve` process. Dropping it sends SIGKILL.
#[derive(Debug)]
pub struct Server {
    process: Process,
    pub socket: PathBuf,
    /// What it printed so far.
    pub log: Arc<Transcript>,
}

impl Server {
    /// Starts `ociblk serve` with `args` (plus `--socket`) and waits until
    /// the socket exists.
    pub fn start(socket: &Path, args: &[&str]) -> Server {
        Server::start_with_env(socket, args, &[])
    }

    /// [`start`](Self::start) with `env` added to its environment.
    pub fn start_with_env(socket: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(ociblk_bin());
        cmd.arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .env("OCIBLK_LOG", "info")
            .envs(env.iter().copied());
        let (process, log) = spawn_followed(&mut cmd, "[ociblk] ");
        let mut server = Server {
            process,
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
            self.socket.exists() || self.try_exit().is_some()
        });
        if let Some(status) = self.try_exit() {
            panic!("ociblk serve exited with {status}:\n{}", self.log.text());
        }
        assert!(
            ok,
            "ociblk serve did not create {} in time:\n{}",
            self.socket.display(),
            self.log.text()
        );
    }

    /// Its exit status, once it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.process.try_exit().expect("waiting for ociblk serve")
    }

    /// Sends `sig`; whether it was sent (the server was not reaped yet).
    pub fn signal(&mut self, sig: i32) -> bool {
        self.process.signal(sig)
    }

    /// Sends `sig` and waits for the exit status.
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> ExitStatus {
        self.process.signal(sig);
        wait_exit(&mut self.process, timeout).unwrap_or_else(|| {
            panic!(
                "ociblk serve did not exit after signal {sig}:\n{}",
                self.log.text()
            )
        })
    }

    /// Waits up to 10 s for a line of its log containing every part, and
    /// returns that line.
    pub fn wait_for_line(&self, parts: &[&str]) -> String {
        let find = |text: &str| {
            text.lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_owned)
        };
        let found = wait_until(Duration::from_secs(10), || find(&self.log.text()).is_some());
        let text = self.log.text();
        assert!(found, "no log line with {parts:?} in:\n{text}");
        find(&text).unwrap_or_default()
    }

    /// Sends SIGTERM and requires a clean exit (requests finished, the
    /// overlay flushed, the socket removed); `context` names the moment.
    pub fn stop_cleanly(&mut self, timeout: Duration, context: &str) {
        let status = self.stop_with(libc::SIGTERM, timeout);
        assert!(
            status.success(),
            "{context}: ociblk serve exited with {status} after SIGTERM:\n{}",
            self.log.text()
        );
    }
}

/// Waits up to `timeout` for `process` to exit.
pub fn wait_exit(process: &mut Process, timeout: Duration) -> Option<ExitStatus> {
    process
        .wait_until(Instant::now() + timeout)
        .expect("waiting for a child")
}

/// How the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads the sample kernel and initramfs directly.
    DirectKernel,
    /// OVMF firmware boots the ESP's `EFI/BOOT/BOOTx64.EFI`.
    Uefi,
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
    /// The guest's own writable OVMF variable store (UEFI boot).
    pub vars: Option<PathBuf>,
    /// Appended to QEMU's command line (`-qmp ...`, `-incoming ...`).
    pub extra_args: Vec<String>,
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
            extra_args: Vec::new(),
        }
    }

    /// The QEMU command, from the launch harness's builder.
    pub fn command(&self) -> QemuCommand {
        let boot = match self.boot {
            Boot::DirectKernel => {
                let guest = sample_guest();
                QemuBoot::Kernel {
                    kernel: guest.join("vmlinuz"),
                    initrd: guest.join("initramfs.cpio.gz"),
                    append: self.append.clone(),
                }
            }
            Boot::Uefi => {
                let code = PathBuf::from(DEFAULT_OVMF_CODE);
                assert!(code.exists(), "OVMF is not installed: run hack/setup");
                QemuBoot::Uefi {
                    code,
                    vars: self
                        .vars
                        .clone()
                        .expect("UEFI boot needs a writable OVMF_VARS copy"),
                }
            }
        };
        let binary = require_tool("qemu-system-x86_64");
        let reconnect = if self.reconnect {
            Reconnect::for_qemu(qemu_version(&binary))
        } else {
            Reconnect::Off
        };
        let mut cmd = QemuCommand::new(
            QemuDisk::VhostUser {
                socket: self.socket.clone(),
                reconnect,
            },
            boot,
        );
        cmd.binary = binary;
        cmd.cpus = 2;
        cmd.memory_mib = self.memory_mib;
        cmd.queues = self.queues;
        cmd.extra_args = self.extra_args.clone();
        cmd
    }
}

/// A QEMU guest whose only disk is a vhost-user-blk device.
#[derive(Debug)]
pub struct Guest {
    process: Process,
    console: Console,
    marker: u64,
}

impl Guest {
    pub fn start(cfg: &GuestConfig) -> Guest {
        let mut cmd = cfg.command().command();
        cmd.stdin(Stdio::piped());
        let (mut process, output) = spawn_followed(&mut cmd, "");
        let input = process.child_mut().stdin.take();
        Guest {
            process,
            console: Console::new(output, input),
            marker: 0,
        }
    }

    /// Everything the console printed so far, carriage returns dropped.
    pub fn transcript(&self) -> String {
        self.console.output().text()
    }

    /// Waits until the console shows `pattern` after what was already
    /// matched, or `timeout` passes; returns the text up to it.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> String {
        match self.console.search(pattern, Instant::now() + timeout) {
            ConsoleSearch::Found { text, .. } => text,
            ConsoleSearch::NotYet => panic!(
                "guest console did not show {pattern:?} within {timeout:?}:\n{}",
                self.tail()
            ),
            ConsoleSearch::Closed => panic!(
                "QEMU exited before the console showed {pattern:?}:\n{}",
                self.tail()
            ),
        }
    }

    fn tail(&self) -> String {
        self.console.output().tail(TAIL_LINES)
    }

    /// Types `line` into the console.
    pub fn send(&mut self, line: &str) {
        self.console.send(line).expect("write to guest console");
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
        wait_exit(&mut self.process, timeout)
            .unwrap_or_else(|| panic!("QEMU did not exit within {timeout:?}:\n{}", self.tail()))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Ends QEMU by its PID (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// A `qemu-storage-daemon` exporting a raw file over vhost-user-blk
/// (writable); killed by its PID and reaped on drop.
#[derive(Debug)]
pub struct StorageDaemon {
    process: Process,
    dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
}

impl StorageDaemon {
    /// Starts the daemon over a `size`-byte file whose content `fill`
    /// writes first, with `queues` request queues. With `failing`, a
    /// blkdebug filter between the file and the raw format fails every read
    /// with EIO.
    pub fn start(size: u64, queues: u16, failing: bool, fill: impl FnOnce(&File)) -> Self {
        let qsd = require_tool("qemu-storage-daemon");
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.raw");
        let socket = dir.path().join("vhost.sock");
        let file = File::create(&image).expect("create image");
        file.set_len(size).expect("size image");
        fill(&file);
        file.sync_all().expect("sync image");
        drop(file);
        let log = File::create(dir.path().join("qsd.log")).expect("create log");
        let mut cmd = Command::new(&qsd);
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ));
        if failing {
            cmd.args([
                "--blockdev",
                r#"{"driver":"blkdebug","node-name":"faulty","image":"file0",
                    "inject-error":[{"event":"read_aio","errno":5,"once":false}]}"#,
                "--blockdev",
                "driver=raw,node-name=disk0,file=faulty",
            ]);
        } else {
            cmd.args(["--blockdev", "driver=raw,node-name=disk0,file=file0"]);
        }
        cmd.arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        let process = Process::spawn(&mut cmd, libc::SIGKILL, None)
            .unwrap_or_else(|e| panic!("starting {}: {e}", qsd.display()));
        let mut daemon = StorageDaemon {
            process,
            dir,
            image,
            socket,
        };
        let ready = wait_until(Duration::from_secs(10), || {
            daemon.socket.exists() || !daemon.is_running()
        });
        assert!(
            daemon.is_running(),
            "qemu-storage-daemon exited at startup:\n{}",
            daemon.log()
        );
        assert!(
            ready,
            "qemu-storage-daemon did not create {} in time:\n{}",
            daemon.socket.display(),
            daemon.log()
        );
        daemon
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qsd.log")).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.process.try_exit(), Ok(None))
    }

    pub fn assert_running(&mut self) {
        assert!(
            self.is_running(),
            "qemu-storage-daemon died:\n{}",
            self.log()
        );
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The daemon's temp directory (its file, socket and log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends `signal` to the daemon (by its PID, while it is unreaped).
    pub fn signal(&mut self, signal: libc::c_int) {
        self.process.signal(signal);
    }

    /// The socket path as a command-line argument.
    pub fn socket_arg(&self) -> &str {
        self.socket.to_str().expect("temp paths are UTF-8")
    }

    /// Connects the vhost-user-blk client.
    pub fn connect(&self, opts: ClientOptions) -> VhostBlkClient {
        VhostBlkClient::connect(&self.socket, opts)
            .unwrap_or_else(|e| panic!("connecting to qemu-storage-daemon: {e}\n{}", self.log()))
    }

    /// `len` bytes of the file at `offset`.
    pub fn read_image(&self, offset: u64, len: usize) -> Vec<u8> {
        let file = File::open(&self.image).expect("open image");
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).expect("read image");
        buf
    }
}
