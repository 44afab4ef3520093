//! Finding the programs the tests drive, running them, and polling.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use ociblk_launch::process::Process;
use ociblk_layout::{Content, Layout};

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

/// Whether children's output is copied to stderr (`OCIBLK_TEST_VERBOSE`).
pub fn verbose() -> bool {
    std::env::var_os("OCIBLK_TEST_VERBOSE").is_some()
}

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `ociblk` binary of this build (`OCIBLK_BIN` overrides).
pub fn ociblk_bin() -> PathBuf {
    workspace_bin("ociblk", "OCIBLK_BIN", "ociblk")
}

/// The `ociblk-bench` binary of this build (`OCIBLK_BENCH_BIN` overrides).
pub fn bench_bin() -> PathBuf {
    workspace_bin("ociblk-bench", "OCIBLK_BENCH_BIN", "ociblk-client")
}

/// Binary `name` of package `package` of this build, or what `env` names.
/// Test binaries live in `target/<profile>/deps/`, the binaries one level up.
fn workspace_bin(name: &str, env: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("test binary has no parent directory");
    assert!(
        candidate.exists(),
        "{} does not exist: build it first (`cargo build -p {package}`, which hack/test does)",
        candidate.display()
    );
    candidate
}

/// Path of an external tool the test needs; fails (never skips) when it is
/// missing, since CI installs everything with `hack/setup`.
pub fn require_tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: run hack/setup");
}

/// The sample OS image built by `hack/mkimage`.
pub fn sample_image() -> PathBuf {
    let dir = workspace_root().join("build/sample-image");
    assert!(
        dir.join("index.json").is_file(),
        "{} is missing: run hack/mkimage (hack/test does)",
        dir.display()
    );
    dir
}

/// Writes byte `value` at `at` of a read-only (0400) file, which stays
/// read-only; returns the byte that was there.
pub fn poke_read_only(path: &Path, at: u64, value: u8) -> u8 {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    let mode = |m| std::fs::set_permissions(path, std::fs::Permissions::from_mode(m));
    mode(0o600).expect("make the file writable");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the file");
    let mut old = [0u8];
    f.read_exact_at(&mut old, at).expect("read the byte");
    f.write_all_at(&[value], at).expect("write the byte");
    mode(0o400).expect("make the file read-only again");
    old[0]
}

/// A copy of the sample image in `to/image` with regular files only (blob
/// symlinks resolved), so that tests may change it; build/sample-image is
/// never touched.
pub fn copy_sample_image(to: &Path) -> PathBuf {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("create the copy's directory");
        for entry in std::fs::read_dir(from).expect("read the sample image") {
            let entry = entry.expect("read the sample image");
            let target = to.join(entry.file_name());
            // metadata() follows symlinks: a linked blob becomes a file.
            let meta = std::fs::metadata(entry.path()).expect("stat a sample image file");
            if meta.is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy a sample image file");
            }
        }
    }
    let dir = to.join("image");
    copy_dir(&sample_image(), &dir);
    dir
}

/// Kernel and initramfs of the sample guest, built with the sample image.
pub fn sample_guest() -> PathBuf {
    sample_image();
    workspace_root().join("build/sample-guest")
}

/// Runs `cmd` and returns its output; panics with stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child started with its stdout and stderr collected, ended by its PID
/// only (killed on drop).
#[derive(Debug)]
pub struct Collected {
    process: Process,
    what: String,
    output: Option<std::thread::JoinHandle<(Vec<u8>, Vec<u8>)>>,
}

impl Collected {
    /// Starts `cmd`, its stdin closed and its output collected.
    pub fn spawn(cmd: &mut Command) -> Collected {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut process = Process::spawn(cmd, libc::SIGKILL, None)
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let child = process.child_mut();
        let pipes = (child.stdout.take(), child.stderr.take());
        let output = std::thread::spawn(move || {
            let (mut o, mut e) = (Vec::new(), Vec::new());
            if let Some(mut stdout) = pipes.0 {
                let _ = stdout.read_to_end(&mut o);
            }
            if let Some(mut stderr) = pipes.1 {
                let _ = stderr.read_to_end(&mut e);
            }
            (o, e)
        });
        Collected {
            process,
            what: format!("{cmd:?}"),
            output: Some(output),
        }
    }

    /// Its exit status, once it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.process
            .try_exit()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what))
    }

    /// Sends `signal`; whether it was sent (the child was not reaped yet).
    pub fn signal(&mut self, signal: libc::c_int) -> bool {
        self.process.signal(signal)
    }

    /// Waits at most `timeout` for the end (then kills it and fails) and
    /// returns what it printed.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let status = self
            .process
            .wait_until(Instant::now() + timeout)
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.what));
        let Some(status) = status else {
            self.process.kill();
            panic!("{} did not finish within {timeout:?}", self.what);
        };
        let (stdout, stderr) = self
            .output
            .take()
            .map(|t| t.join().expect("output reader"))
            .unwrap_or_default();
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

/// Runs `cmd` to its end, at most `timeout` (then kills it and fails).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    Collected::spawn(cmd).finish(timeout)
}

/// Runs `cmd`, expects it to fail, and returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded but should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Disk offsets of `layout` where byte `at` of payload `name` is served, in
/// extent order (a file can appear more than once, like the kernel on the
/// ESP as boot-a.efi and BOOTx64.EFI).
pub fn payload_disk_offsets(layout: &Layout, name: &str, at: u64) -> Vec<u64> {
    let source = layout
        .sources
        .iter()
        .position(|s| s.name == name)
        .unwrap_or_else(|| panic!("no payload {name} in the layout"));
    let mut out = Vec::new();
    for e in layout.extents.extents() {
        if let Content::File { source: s, offset } = e.content
            && s == source
            && (offset..offset + e.len).contains(&at)
        {
            out.push(e.start + (at - offset));
        }
    }
    out
}
