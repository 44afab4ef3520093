//! Test support: a real registry (Debian's `docker-registry`) on loopback
//! with its own storage, the sample image pushed to it with `skopeo`, and a
//! small loopback proxy that counts requests or rewrites answers.
//!
//! Shared by the registry's own tests and the workspace's end-to-end tests
//! (`ociblk-tests`) as a dev-dependency.

pub mod fixture;
pub mod loopback;
pub mod pki;
pub mod proxy;
pub mod relay;
pub mod token;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ociblk_registry::{BlobSpec, ChunkHashes, Digest};

/// How long a registry may take to answer `/v2/` after start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds `tool` on `PATH`, or fails the test saying how to install it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{tool} not found on PATH: install Debian's {package} package (hack/setup)")
        })
}

/// How the registry asks clients to authenticate.
#[derive(Debug)]
pub enum Auth<'a> {
    Open,
    /// HTTP Basic, checked against these `user:bcrypt-hash` lines.
    Htpasswd(&'a str),
    /// Bearer tokens from this issuer.
    Token(&'a token::TokenIssuer),
}

/// How a registry serves TLS: its certificate and key, and the CA its
/// clients' certificates must come from (mutual TLS).
#[derive(Clone, Debug)]
pub struct TlsServe {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// A certs.d-style directory with a client certificate skopeo pushes
    /// with, for a registry that asks for one.
    pub push_cert_dir: Option<PathBuf>,
}

/// Everything a test registry is started with.
#[derive(Debug)]
pub struct Setup<'a> {
    pub auth: Auth<'a>,
    pub tls: Option<TlsServe>,
    /// Run as a pull-through cache of the registry at this URL.
    pub proxy_remote: Option<String>,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            auth: Auth::Open,
            tls: None,
            proxy_remote: None,
        }
    }
}

/// A `docker-registry serve` process on 127.0.0.1, stopped on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub tls: Option<TlsServe>,
    storage: PathBuf,
    log: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry with empty storage on a free loopback port and
    /// waits (bounded) until `/v2/` answers.
    pub fn start() -> Registry {
        Registry::start_with(Auth::Open)
    }

    /// Starts a registry that asks clients to authenticate as `auth` says.
    pub fn start_with(auth: Auth) -> Registry {
        Registry::start_setup(Setup {
            auth,
            ..Setup::default()
        })
    }

    /// Starts a registry serving TLS as `tls` says.
    pub fn start_tls(tls: TlsServe) -> Registry {
        Registry::start_setup(Setup {
            tls: Some(tls),
            ..Setup::default()
        })
    }

    /// Starts a pull-through cache of the registry at `remote_url`.
    pub fn start_proxy_of(remote_url: &str) -> Registry {
        Registry::start_setup(Setup {
            proxy_remote: Some(remote_url.to_string()),
            ..Setup::default()
        })
    }

    /// Starts a registry as `setup` says.
    pub fn start_setup(setup: Setup) -> Registry {
        let Setup {
            auth,
            tls,
            proxy_remote,
        } = setup;
        // Fail early, naming the package, when the registry is not installed.
        require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("create registry storage");
        // The port is free when we ask; another program taking it before the
        // registry binds shows as the registry exiting, reported below.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .expect("write registry config");
        let auth_config = match auth {
            Auth::Open => String::new(),
            Auth::Htpasswd(lines) => {
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, lines).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: ociblk-test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token(issuer) => issuer.registry_config(),
        };
        let mut config_text = std::fs::read_to_string(&config).expect("read config");
        if let Some(tls) = &tls {
            config_text.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                tls.cert.display(),
                tls.key.display()
            ));
            if let Some(ca) = &tls.client_ca {
                config_text.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        if let Some(remote) = &proxy_remote {
            config_text.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        config_text.push_str(&auth_config);
        std::fs::write(&config, config_text).expect("write registry config");
        let mut registry = Registry {
            child: None,
            addr,
            tls,
            storage,
            log: dir.path().join("registry.log"),
            config,
            _dir: dir,
        };
        registry.spawn();
        registry
    }

    /// Starts the registry process on its address and storage, and waits
    /// until it answers.
    fn spawn(&mut self) {
        let binary = require_tool("docker-registry", "docker-registry");
        let log_file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open registry log");
        let child = Command::new(binary)
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup log"))
            .stderr(log_file)
            .spawn()
            .expect("spawn docker-registry");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Starts a stopped registry again, same address and storage.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running registry");
        self.spawn();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "docker-registry exited ({status}) before answering: {}",
                    self.log_text()
                );
            }
            // 401: up, and asking for credentials; 400: a TLS registry's
            // answer to plain HTTP (it is up).
            let up = matches!(
                (http_get_status(self.addr, "/v2/"), &self.tls),
                (Some(200 | 401), None) | (Some(400), Some(_))
            );
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer /v2/ on {} within {START_TIMEOUT:?}: {}",
                self.addr,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Pushes the OCI layout `image` as `repo_tag` with skopeo.
    pub fn push(&self, image: &Path, repo_tag: &str) {
        self.push_as(image, repo_tag, None);
    }

    /// Pushes with `user:password` credentials when given.
    pub fn push_as(&self, image: &Path, repo_tag: &str, creds: Option<&str>) {
        let skopeo = require_tool("skopeo", "skopeo");
        let mut command = Command::new(skopeo);
        command.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some(creds) = creds {
            command.arg(format!("--dest-creds={creds}"));
        }
        if let Some(dir) = self.tls.as_ref().and_then(|t| t.push_cert_dir.as_ref()) {
            command.arg(format!("--dest-cert-dir={}", dir.display()));
        }
        let out = command
            .arg(format!("oci:{}", image.display()))
            .arg(format!("docker://{}/{repo_tag}", self.addr))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy to {}/{repo_tag} failed: {}",
            self.addr,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The file in the registry's storage holding blob `digest`.
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Flips the bits of the byte at `offset` of blob `digest` in storage.
    pub fn corrupt_blob(&self, digest: &Digest, offset: u64) {
        let path = self.blob_file(digest);
        let mut bytes = std::fs::read(&path).expect("read stored blob");
        bytes[offset as usize] ^= 0xff;
        std::fs::write(&path, bytes).expect("write stored blob");
    }

    /// Replaces `from` by `to` (same length) in blob `digest` in storage:
    /// wrong bytes that still parse.
    pub fn rewrite_blob(&self, digest: &Digest, from: &str, to: &str) {
        assert_eq!(from.len(), to.len(), "a rewrite keeps the blob's size");
        let path = self.blob_file(digest);
        let text = std::fs::read_to_string(&path).expect("read stored blob");
        assert!(
            text.contains(from),
            "{} does not contain {from:?}",
            path.display()
        );
        std::fs::write(&path, text.replacen(from, to, 1)).expect("write stored blob");
    }

    /// Overwrites bytes at `offset` of blob `digest` in storage: a registry
    /// that serves other bytes under the digest.
    pub fn write_blob(&self, digest: &Digest, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.blob_file(digest))
            .and_then(|f| f.write_all_at(bytes, offset))
            .expect("write stored blob");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the registry (by its PID) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tmpfs mounted for the life of the value (root only).
#[derive(Debug)]
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test mounts a tmpfs and must run as root (CI does); run it with sudo"
        );
        std::fs::create_dir_all(at).expect("create mount point");
        let status = std::process::Command::new(require_tool("mount", "mount"))
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount tmpfs at {}: {status}",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Status of a plain `GET path` to `addr`, `None` when nothing answers.
pub fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The sample OS image of the workspace (`build/sample-image`), read
/// directly from its layout as the reference to compare against.
#[derive(Debug)]
pub struct SampleImage {
    pub dir: PathBuf,
    pub manifest_digest: Digest,
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
    pub config_digest: Digest,
    /// Payload blobs in layer order, with their chunk hashes.
    pub payloads: Vec<(String, BlobSpec)>,
}

impl SampleImage {
    pub fn load() -> SampleImage {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/sample-image");
        let read = |p: PathBuf| {
            std::fs::read(&p).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (build the sample image with hack/mkimage)",
                    p.display()
                )
            })
        };
        let digest = |d: &serde_json::Value| -> Digest {
            d.as_str().expect("digest").parse().expect("sha256")
        };
        let blob = |d: &Digest| dir.join("blobs/sha256").join(d.hex());
        let index: serde_json::Value =
            serde_json::from_slice(&read(dir.join("index.json"))).expect("index.json");
        let manifest_digest = digest(&index["manifests"][0]["digest"]);
        let manifest = read(blob(&manifest_digest));
        let m: serde_json::Value = serde_json::from_slice(&manifest).expect("manifest JSON");
        let config_digest = digest(&m["config"]["digest"]);
        let config = read(blob(&config_digest));
        let c: serde_json::Value = serde_json::from_slice(&config).expect("config JSON");
        let layers = m["layers"].as_array().expect("layers");
        let payloads = c["payloads"].as_array().expect("payloads");
        assert_eq!(layers.len(), payloads.len(), "one payload per layer");
        let payloads = layers
            .iter()
            .zip(payloads)
            .map(|(layer, payload)| {
                let hashes: Vec<[u8; 32]> = payload["chunk_hashes_sha256"]
                    .as_array()
                    .expect("chunk_hashes_sha256")
                    .iter()
                    .map(|h| {
                        base64::engine::general_purpose::STANDARD_NO_PAD
                            .decode(h.as_str().expect("hash string"))
                            .expect("base64 hash")
                            .try_into()
                            .expect("32-byte hash")
                    })
                    .collect();
                let table = ChunkHashes::new(
                    layer["size"].as_u64().expect("size"),
                    payload["hash_chunk_size"].as_u64().expect("chunk size"),
                    hashes,
                )
                .expect("one hash per chunk");
                let spec = BlobSpec::new(digest(&layer["digest"]), Arc::new(table));
                (payload["name"].as_str().expect("name").to_string(), spec)
            })
            .collect();
        SampleImage {
            manifest_digest,
            config_digest,
            manifest,
            config,
            payloads,
            dir,
        }
    }

    /// The payload named `name`.
    pub fn payload(&self, name: &str) -> &BlobSpec {
        &self
            .payloads
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("sample image has no payload {name}"))
            .1
    }

    /// The bytes of chunk `index` of `blob`, from the layout.
    pub fn chunk(&self, blob: &BlobSpec, index: u64) -> Vec<u8> {
        let bytes = std::fs::read(self.dir.join("blobs/sha256").join(blob.digest.hex()))
            .expect("read payload blob");
        let (start, len) = blob.chunk_range(index);
        bytes[start as usize..(start + len) as usize].to_vec()
    }
}

/// A copy of the sample image whose config gives one chunk of a payload
/// another hash: the image of whoever serves other bytes under the
/// payload's digest.
#[derive(Debug)]
pub struct AlteredImage {
    /// Its OCI layout (payload blobs as in the sample image).
    pub dir: PathBuf,
    pub manifest_digest: Digest,
    /// The payload as this image describes it.
    pub blob: BlobSpec,
    /// The changed chunk's new bytes.
    pub chunk: Vec<u8>,
}

impl SampleImage {
    /// Writes to `dir` the sample image with chunk `index` of payload
    /// `name` changed (every byte inverted) in its config's chunk hashes.
    pub fn with_chunk_changed(&self, dir: &Path, name: &str, index: u64) -> AlteredImage {
        use sha2::Digest as _;
        let blob = self.payload(name).clone();
        let chunk: Vec<u8> = self.chunk(&blob, index).iter().map(|b| !b).collect();
        let hash: [u8; 32] = sha2::Sha256::digest(&chunk).into();
        let mut config: serde_json::Value = serde_json::from_slice(&self.config).expect("config");
        let payload = config["payloads"]
            .as_array_mut()
            .expect("payloads")
            .iter_mut()
            .find(|p| p["name"] == name)
            .expect("payload in config");
        payload["chunk_hashes_sha256"][index as usize] =
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(hash)
                .into();
        let config = serde_json::to_vec(&config).expect("config JSON");
        let config_digest = Digest::of(&config);
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&self.manifest).expect("manifest");
        manifest["config"]["digest"] = config_digest.to_string().into();
        manifest["config"]["size"] = config.len().into();
        let manifest = serde_json::to_vec(&manifest).expect("manifest JSON");
        let manifest_digest = Digest::of(&manifest);
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("layout dir");
        std::fs::copy(self.dir.join("oci-layout"), dir.join("oci-layout")).expect("oci-layout");
        for (_, p) in &self.payloads {
            std::fs::copy(
                self.dir.join("blobs/sha256").join(p.digest.hex()),
                blobs.join(p.digest.hex()),
            )
            .expect("copy payload");
        }
        std::fs::write(blobs.join(config_digest.hex()), &config).expect("config");
        std::fs::write(blobs.join(manifest_digest.hex()), &manifest).expect("manifest");
        let index_json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest.to_string(),
                "size": manifest.len(),
            }],
        });
        std::fs::write(dir.join("index.json"), index_json.to_string()).expect("index.json");
        let mut hashes = blob.table.hashes().to_vec();
        hashes[index as usize] = hash;
        let table = ChunkHashes::new(blob.size(), blob.chunk_size(), hashes).expect("same count");
        AlteredImage {
            dir: dir.to_path_buf(),
            manifest_digest,
            blob: BlobSpec::new(blob.digest, Arc::new(table)),
            chunk,
        }
    }
}

/// Bytes `[start, start+len)` of the file at `path`.
pub fn read_range(path: &Path, start: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(path).expect("open cached blob");
    let mut buf = vec![0; len as usize];
    f.read_exact_at(&mut buf, start).expect("read cached blob");
    buf
}

/// Writes the chunk SHA-256s of `blob`, one hex digest a line (the
/// `--hashes` file of `ociblk-registry-fetch`), to `dir/hashes`.
pub fn write_chunk_hashes(dir: &Path, blob: &BlobSpec) -> PathBuf {
    let hashes = dir.join("hashes");
    let lines: Vec<String> = blob.table.hashes().iter().map(hex::encode).collect();
    std::fs::write(&hashes, lines.join("\n")).expect("write hashes");
    hashes
}
