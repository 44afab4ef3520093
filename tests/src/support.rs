//! Finding the programs the tests drive.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Root of the workspace.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `ociblk` binary of this build (`OCIBLK_BIN` overrides). Test binaries
/// live in `target/<profile>/deps/`, the binary one level up.
pub fn ociblk_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OCIBLK_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("ociblk"))
        .expect("test binary has no parent directory");
    assert!(
        candidate.exists(),
        "{} does not exist: build it first (`cargo build -p ociblk`, which hack/test does)",
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
