//! `ociblk serve`'s command line: its options as clap parses them
//! ([`ServeArgs`]), and the same options written back as arguments
//! ([`ServeArgs::to_args`]), which is how `ociblk launch` gives each node's
//! server the options it chose for it on the typed fields.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, ValueEnum};
use ociblk_server::config;

use super::command_line::CommandLine;
use super::layout_args::LayoutArgs;

/// What FLUSH requests promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlushArg {
    /// Flushed writes survive a crash of ociblk, QEMU or the host.
    Safe,
    /// No syncs (like QEMU's cache=unsafe): flushed writes survive a crash
    /// of ociblk or QEMU, not of the host. For throwaway test clusters.
    Unsafe,
}

/// `ociblk serve`'s options.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Unix socket to listen on (created with mode 0600, at most 107 bytes;
    /// QEMU connects here). `<PATH>.lock` is held while serving, so that
    /// only one server at a time takes the path.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The node's copy-on-write overlay file (created when missing).
    #[arg(long, value_name = "FILE", required_unless_present = "read_only")]
    pub overlay: Option<PathBuf>,
    /// A frozen layer under the overlay (`ociblk overlay freeze`); repeat,
    /// bottom layer first. A new overlay records the chain (paths made
    /// absolute), so later starts need no --layer; for an existing one the
    /// layers given must have the digests it records, in order.
    #[arg(long = "layer", value_name = "FILE", requires = "overlay")]
    pub layers: Vec<PathBuf>,
    /// Request queues offered, one worker thread each (QEMU may use fewer).
    #[arg(long, default_value_t = config::DEFAULT_QUEUES,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(config::MAX_QUEUES)))]
    pub queues: u16,
    /// Largest virtqueue size accepted (power of two, at least QEMU's queue-size).
    #[arg(long, default_value_t = config::DEFAULT_QUEUE_SIZE)]
    pub queue_size: u16,
    /// Present the disk read-only. The overlay, if given, must exist; it is
    /// opened read-only, locked shared (no server can write it meanwhile)
    /// and never modified.
    #[arg(long)]
    pub read_only: bool,
    /// Serial number the guest sees (GET_ID, at most 20 bytes); default: the seed.
    #[arg(long)]
    pub serial: Option<String>,
    /// Durability of guest flushes.
    #[arg(long, value_enum, default_value_t = FlushArg::Safe)]
    pub flush: FlushArg,
    /// Seconds a new connection has to ask for its features (GET_FEATURES
    /// and GET_PROTOCOL_FEATURES, which QEMU sends as it connects) before
    /// it is dropped; an established frontend is never timed out.
    #[arg(long, value_name = "SECONDS",
          default_value_t = config::DEFAULT_HANDSHAKE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_timeout: u64,
    /// Serve payload bytes without checking them against the image's chunk
    /// hashes (by default each chunk is verified when it is first read).
    /// For a registry image only cached chunks go unchecked: a chunk is
    /// still verified when it is fetched, before it enters the cache.
    #[arg(long)]
    pub no_verify: bool,
    /// I/O helper threads that, with the queue workers, run a queue's
    /// requests concurrently (completions still reach the guest in order);
    /// 0: every request runs on its queue's worker.
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_IO_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(0..=config::MAX_IO_THREADS as i64))]
    pub io_threads: u16,
    /// Longest time, in microseconds, a queue worker polls its ring for the
    /// next request before sleeping; the window adapts between 0 and this,
    /// and polling pauses while the host's CPUs are contended. 0 disables
    /// polling.
    #[arg(long, value_name = "US", default_value_t = config::DEFAULT_POLL_MAX_US,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(config::MAX_POLL_US)))]
    pub poll_max_us: u32,
    /// Record the order in which the guest first reads payload chunks, and
    /// write it to FILE (mode 0600, replaced atomically) when the server
    /// stops on SIGTERM, SIGINT or SIGHUP (not after SIGKILL). For a
    /// registry image a copy is kept in the cache, and later starts of the
    /// image on this host prefetch from it. Replay it with --prefetch.
    #[arg(long, value_name = "FILE")]
    pub record_access: Option<PathBuf>,
    /// Prefetch the chunks an access record (--record-access) lists, in its
    /// order, in one background thread behind guest reads, from the start:
    /// a registry image's chunks are fetched into the cache and verified,
    /// a local layout's are read and verified ahead. A record made for
    /// another image is refused. Without this option a registry image is
    /// prefetched from the record the cache holds for it, if any.
    #[arg(long, value_name = "FILE", conflicts_with = "no_prefetch")]
    pub prefetch: Option<PathBuf>,
    /// Do not prefetch from the access record the cache holds for a
    /// registry image.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Take the node over from a server that still holds the overlay (the
    /// destination of a live migration): listen and answer the frontend's
    /// handshake from the layout alone, and open (lock) the overlay only at
    /// the disk's first request, waiting up to SECONDS for the other server
    /// to release it. After that, requests fail with an I/O error while the
    /// overlay stays locked. Start this server before the destination QEMU.
    #[arg(long, value_name = "SECONDS", requires = "overlay", conflicts_with = "read_only",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub wait_for_overlay: Option<u64>,
}

impl FlushArg {
    /// The value `--flush` takes for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushArg::Safe => "safe",
            FlushArg::Unsafe => "unsafe",
        }
    }
}

/// `ociblk serve`'s arguments alone, without the `ociblk` command line
/// around them.
#[derive(Debug, Parser)]
#[command(name = "ociblk serve", no_binary_name = true)]
struct ServeCommand {
    #[command(flatten)]
    serve: ServeArgs,
}

impl ServeArgs {
    /// Parses the arguments after `ociblk serve` as `ociblk serve` does;
    /// clap's error names an argument it refuses.
    pub fn try_parse_args<T: Into<OsString> + Clone>(
        args: impl IntoIterator<Item = T>,
    ) -> Result<ServeArgs, clap::Error> {
        ServeCommand::try_parse_from(args).map(|c| c.serve)
    }

    /// The arguments after `ociblk serve` that give these options: parsed
    /// again ([`ServeArgs::try_parse_args`]) they give the same options.
    /// Every option is written, defaults included, so that nothing depends
    /// on the defaults of the `ociblk` that runs them.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut line = CommandLine::default();
        self.layout.write_args(&mut line);
        line.option("--socket", &self.socket);
        line.optional("--overlay", self.overlay.as_ref());
        line.repeated("--layer", &self.layers);
        line.option("--queues", self.queues.to_string());
        line.option("--queue-size", self.queue_size.to_string());
        line.flag("--read-only", self.read_only);
        line.optional("--serial", self.serial.as_ref());
        line.option("--flush", self.flush.as_str());
        line.option("--handshake-timeout", self.handshake_timeout.to_string());
        line.flag("--no-verify", self.no_verify);
        line.option("--io-threads", self.io_threads.to_string());
        line.option("--poll-max-us", self.poll_max_us.to_string());
        line.optional("--record-access", self.record_access.as_ref());
        line.optional("--prefetch", self.prefetch.as_ref());
        line.flag("--no-prefetch", self.no_prefetch);
        line.optional(
            "--wait-for-overlay",
            self.wait_for_overlay.map(|s| s.to_string()),
        );
        line.into_args()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;

    use clap::CommandFactory;
    use ociblk_layout::Guid;

    use super::super::layout_args::{ImageArgs, RegistryArgs};
    use super::*;

    /// Options with every field set away from its default, values that
    /// look like options and a path that is not UTF-8 among them.
    fn everything() -> ServeArgs {
        let guid = |s: &str| s.parse::<Guid>().unwrap();
        ServeArgs {
            layout: LayoutArgs {
                image: ImageArgs {
                    image: "reg.example:5000/os@sha256:00".into(),
                    registry: RegistryArgs {
                        cache: Some("/c a,che".into()),
                        insecure_registries: vec!["a.example".into(), "b.example:1".into()],
                        cert_dir: Some("-certs".into()),
                        registries_conf: Some("/r.conf".into()),
                        fetch_timeout: 7,
                        allow_insecure_cache_dir: true,
                    },
                },
                seed: "-node".into(),
                disk_size: 1 << 33,
                esp_size: 1 << 26,
                system_size: 1 << 29,
                no_data_partition: true,
                abloader: Some("/a/abloader.efi".into()),
                node_parameters: Some(PathBuf::from(OsString::from_vec(b"/p/\xff.pb".to_vec()))),
                disk_guid: Some(guid("D1111111-2222-4333-8444-555555555551")),
                esp_guid: Some(guid("D1111111-2222-4333-8444-555555555552")),
                system_a_guid: Some(guid("D1111111-2222-4333-8444-555555555553")),
                system_b_guid: Some(guid("D1111111-2222-4333-8444-555555555554")),
                data_guid: Some(guid("D1111111-2222-4333-8444-555555555555")),
                fat_volume_id: Some(0x00C0_FFEE),
            },
            socket: "/s/node.sock".into(),
            overlay: Some("/s/node.overlay".into()),
            layers: vec!["/l/1.layer".into(), "-2.layer".into()],
            queues: 3,
            queue_size: 64,
            read_only: false,
            serial: Some("".into()),
            flush: FlushArg::Unsafe,
            handshake_timeout: 9,
            no_verify: true,
            io_threads: 0,
            poll_max_us: 0,
            record_access: Some("/r/boot.access.node-1".into()),
            prefetch: None,
            no_prefetch: true,
            wait_for_overlay: Some(11),
        }
    }

    /// [`everything`], with the other side of every flag and optional
    /// value (those that conflict with one set there).
    fn the_other_sides() -> ServeArgs {
        ServeArgs {
            read_only: true,
            overlay: None,
            layers: Vec::new(),
            wait_for_overlay: None,
            serial: Some("-x".into()),
            flush: FlushArg::Safe,
            no_verify: false,
            record_access: None,
            prefetch: Some("boot.access".into()),
            no_prefetch: false,
            ..everything()
        }
    }

    fn round_trip(args: &ServeArgs) {
        let rendered = args.to_args();
        let parsed = ServeArgs::try_parse_args(&rendered)
            .unwrap_or_else(|e| panic!("{rendered:?} does not parse: {e}"));
        assert_eq!(&parsed, args, "{rendered:?}");
    }

    #[test]
    fn options_written_as_arguments_parse_to_the_same_options() {
        round_trip(&everything());
        round_trip(&the_other_sides());
        // As `ociblk serve` parses its fewest arguments: the defaults.
        let least =
            ServeArgs::try_parse_args(["--image", "i", "--socket", "s", "--read-only"]).unwrap();
        round_trip(&least);
    }

    /// An option added to `ociblk serve` but not to `to_args` fails here.
    #[test]
    fn every_option_of_serve_is_written() {
        let rendered: Vec<String> = [everything(), the_other_sides()]
            .iter()
            .flat_map(ServeArgs::to_args)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        for arg in ServeCommand::command().get_arguments() {
            let Some(long) = arg.get_long().filter(|l| !["help", "version"].contains(l)) else {
                continue;
            };
            let option = format!("--{long}");
            assert!(
                rendered
                    .iter()
                    .any(|a| *a == option || a.starts_with(&format!("{option}="))),
                "{option} is not in {rendered:?}"
            );
        }
    }

    #[test]
    fn a_refused_argument_is_named() {
        let err = ServeArgs::try_parse_args(["--image", "i", "--socket", "s", "--flsh", "unsafe"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--flsh"), "{err}");
    }
}
