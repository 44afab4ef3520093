//! Credentials where container tools keep them, against Debian's
//! `docker-registry` with htpasswd auth: docker's `credHelpers` and
//! `credsStore` with a helper script speaking the helper protocol,
//! `REGISTRY_AUTH_FILE` and `$XDG_RUNTIME_DIR/containers/auth.json`. Each
//! case runs `ociblk-registry-fetch` with an environment of its own.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use ociblk_registry_test_support::fixture::{Fixture, REPO_TAG};
use ociblk_registry_test_support::{Auth, Registry, write_chunk_hashes};

/// `ociblk:test-password`, bcrypt.
const HTPASSWD: &str = "ociblk:$2b$04$1zGbIXKr/YkKwu3FCABTyuFbfoL4aZ1T0FcV0uB7HcF5qzwvNVHuy\n";
const PASSWORD: &str = "test-password";

struct Case {
    fx: Fixture,
    /// HOME, and the helper's directory on PATH.
    home: PathBuf,
    bin: PathBuf,
    /// Where the helper logs each request's stdin.
    helper_log: PathBuf,
}

impl Case {
    fn new() -> Case {
        let fx = Fixture::pushed_to(
            Registry::start_with(Auth::Htpasswd(HTPASSWD)),
            Some(&format!("ociblk:{PASSWORD}")),
        );
        let home = fx.dir.path().join("home");
        let bin = fx.dir.path().join("bin");
        std::fs::create_dir_all(&home).expect("home");
        std::fs::create_dir_all(&bin).expect("bin");
        let helper_log = fx.dir.path().join("helper.log");
        Case {
            fx,
            home,
            bin,
            helper_log,
        }
    }

    /// Installs `docker-credential-NAME`: it logs the server it is asked
    /// for and answers with `answer` (a shell fragment) for `get`.
    fn helper(&self, name: &str, answer: &str) {
        let path = self.bin.join(format!("docker-credential-{name}"));
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nserver=$(cat)\n\
             printf '%s\\n' \"$server\" >> '{}'\n{answer}\n",
            self.helper_log.display()
        );
        std::fs::write(&path, script).expect("write helper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// The helper's answer with the right credentials.
    fn good_answer(&self) -> String {
        format!(
            "printf '{{\"ServerURL\":\"%s\",\"Username\":\"ociblk\",\"Secret\":\"{PASSWORD}\"}}' \"$server\""
        )
    }

    fn helper_calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.helper_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Runs the fetcher for chunk 0 of the kernel with only `env` (and
    /// HOME, PATH) set.
    fn fetch(&self, env: &[(&str, &Path)]) -> Output {
        let kernel = self.fx.sample.payload("kernel.efi");
        let hashes = write_chunk_hashes(self.fx.dir.path(), kernel);
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_ociblk-registry-fetch"));
        command
            .env_clear()
            .env("HOME", &self.home)
            .env("PATH", path)
            .env("RUST_LOG", "debug")
            .arg("--cache")
            .arg(self.fx.cache.dir())
            .arg(format!("{}/{REPO_TAG}", self.fx.registry.host()))
            .arg(kernel.digest.to_string())
            .arg(kernel.chunk_size().to_string())
            .arg(hashes)
            .arg("0");
        for (name, value) in env {
            command.env(name, value);
        }
        let out = command.output().expect("run ociblk-registry-fetch");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("ociblk:{PASSWORD}"));
        assert!(
            !stderr.contains(PASSWORD) && !stderr.contains(&basic),
            "the secret is in the log: {stderr}"
        );
        out
    }
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "fetch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_json(path: &Path, json: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(path, json).expect("write auth file");
}

#[test]
fn a_cred_helper_for_the_registry_gives_the_credentials_once_per_process() {
    let case = Case::new();
    let host = case.fx.registry.host();
    case.helper("ocitest", &case.good_answer());
    let docker = case.fx.dir.path().join("docker");
    write_json(
        &docker.join("config.json"),
        &format!(r#"{{"credHelpers":{{"{host}":"ocitest","other.example":"none"}}}}"#),
    );
    succeeded(&case.fetch(&[("DOCKER_CONFIG", &docker)]));
    assert_eq!(case.helper_calls(), std::slice::from_ref(&host));

    // A helper without credentials for the registry: the registry's
    // challenge is answered with none.
    case.helper(
        "ocitest",
        "echo 'credentials not found in native keychain'; exit 1",
    );
    std::fs::remove_dir_all(case.fx.cache.dir()).expect("empty the cache");
    let out = case.fetch(&[("DOCKER_CONFIG", &docker)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("asks for a password; none is stored"),
        "{stderr}"
    );

    // A helper that fails is named with the file and field.
    case.helper("ocitest", "echo 'keychain locked' >&2; exit 2");
    let out = case.fetch(&[("DOCKER_CONFIG", &docker)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("credential helper docker-credential-ocitest")
            && stderr.contains(&format!("credHelpers.{host}"))
            && stderr.contains("keychain locked"),
        "{stderr}"
    );
}

#[test]
fn creds_store_from_registry_auth_file_and_auths_from_the_runtime_dir() {
    let case = Case::new();
    case.helper("store", &case.good_answer());
    let auth_file = case.fx.dir.path().join("elsewhere/auth.json");
    write_json(&auth_file, r#"{"credsStore":"store"}"#);
    succeeded(&case.fetch(&[("REGISTRY_AUTH_FILE", &auth_file)]));
    assert_eq!(case.helper_calls(), [case.fx.registry.host()]);

    std::fs::remove_dir_all(case.fx.cache.dir()).expect("empty the cache");
    let runtime = case.fx.dir.path().join("run");
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("ociblk:{PASSWORD}"));
    write_json(
        &runtime.join("containers/auth.json"),
        &format!(
            r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#,
            case.fx.registry.host()
        ),
    );
    succeeded(&case.fetch(&[("XDG_RUNTIME_DIR", &runtime)]));
    // REGISTRY_AUTH_FILE replaces the runtime dir's file.
    std::fs::remove_dir_all(case.fx.cache.dir()).expect("empty the cache");
    let empty = case.fx.dir.path().join("empty.json");
    write_json(&empty, "{}");
    let out = case.fetch(&[
        ("XDG_RUNTIME_DIR", &runtime),
        ("REGISTRY_AUTH_FILE", &empty),
    ]);
    assert!(!out.status.success(), "the runtime dir's file was read");
}
