//! `ociblk launch`: a test cluster of QEMU nodes, each booting its own node
//! disk served by its own `ociblk serve`.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use ociblk_layout::parse_size;
use tracing::info;

use super::command_line::CommandLine;
use super::layout_args::RegistryArgs;
use super::serve_args::ServeArgs;
use crate::image_source::open_image;
use ociblk_launch::snapshot::{self, Fork, RunningMachine};
use ociblk_launch::{
    Cluster, ClusterSpec, DEFAULT_ACCEL, DEFAULT_CPUS, DEFAULT_OVMF_CODE, DEFAULT_OVMF_VARS,
    DEFAULT_QEMU_BINARY, DEFAULT_QUEUES, DEFAULT_SWTPM_BINARY, LaunchError, NetworkSpec, NodeSpec,
    QemuSpec, TpmSpec,
};
use ociblk_server::ShutdownSignal;
use ociblk_server::config::MAX_QUEUES;

/// Most nodes one launch starts.
const MAX_NODES: u64 = 64;
/// How often a running cluster is checked for signals and exited guests.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);
const MIB: u64 = 1 << 20;
/// Typed on every console before a save: the guest's writes reach the
/// backend, then the machine powers off (QEMU exits).
const POWER_OFF_COMMAND: &str = "sync && poweroff -f";

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// OS image: an OCI image layout directory in Monogon's format, or a
    /// registry reference HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]. A tag is
    /// resolved once, here, and every node is served that digest from the
    /// shared host cache.
    #[arg(long, value_name = "DIR|REF", required_unless_present = "from")]
    pub image: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Number of nodes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_NODES))]
    pub nodes: u64,
    // Not a doc comment: rustdoc would read <PREFIX> as HTML.
    #[arg(
        long,
        default_value = "node",
        value_name = "PREFIX",
        help = "Nodes are named <PREFIX>-1, <PREFIX>-2, ...; a node's name is also its disk's seed"
    )]
    pub name_prefix: String,
    /// Once every node showed --wait-for: power the guests off (`sync &&
    /// poweroff -f` on their consoles, bounded by --timeout), stop the
    /// backends and swtpms, and save the cluster into the new directory
    /// SNAPDIR: every node's overlay frozen into a layer, its OVMF variables
    /// and TPM state, and cluster.json with their digests (written last: a
    /// directory without it is no snapshot). The state directory's overlays then sit over the
    /// new layers. All files in SNAPDIR are read-only. A save failing before
    /// any overlay was frozen removes what it made in SNAPDIR.
    #[arg(long, value_name = "SNAPDIR", requires = "wait_for")]
    pub save: Option<PathBuf>,
    /// With --save: save the cluster running instead of powering it off.
    /// Once every node showed --wait-for, every guest is paused and its VM
    /// state (memory, CPUs, devices, TPM state) written to
    /// SNAPDIR/NODE/vmstate by QEMU's migration to a file; then QEMU
    /// quits, the backends stop and the overlays are frozen as for --save.
    /// cluster.json says "running": true and records each VM state's
    /// sha256 and the guests' memory size and vCPUs. The cluster stops
    /// after the save; its forks (--from SNAPDIR) continue where the
    /// guests were, without firmware or boot.
    #[arg(long, requires = "save")]
    pub live: bool,
    /// Start a fork of the snapshot SNAPDIR in a fresh --state-dir: every
    /// node gets a new overlay over its frozen layers and copies of its
    /// OVMF variables and TPM state; image, nodes, serve arguments, queues,
    /// TPM and network come from the snapshot. cluster.json is checked
    /// whole before any file is made, and every layer and state file must
    /// have the digest it records (a snapshot directory moved or copied as
    /// a whole forks its own layers). Forks of one snapshot run
    /// side by side; a fork can be saved and forked again. A running
    /// snapshot (--save --live) is restored: each QEMU loads its node's VM
    /// state, every guest continues at once, with the snapshot's memory
    /// size and vCPUs, on a network segment of its own; --wait-for is then
    /// not waited for (the guests showed it before the save). If the fork
    /// fails or is interrupted before its cluster runs (a missing or
    /// modified layer, a server that does not start, ...), the node
    /// directories it made (and --state-dir, if it made that) are removed.
    #[arg(long, value_name = "SNAPDIR", conflicts_with_all = ["image", "nodes", "name_prefix", "serve_args", "network", "uplink", "tpm"])]
    pub from: Option<PathBuf>,
    /// Holds a directory per node: socket, overlay, OVMF variables, TPM
    /// state, logs, PID files. Relaunching with the same directory keeps the nodes' disks.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Wait until every node's console shows this text (e.g. "ociblk-sample: ready").
    #[arg(long, value_name = "TEXT")]
    pub wait_for: Option<String>,
    /// How long --wait-for waits (e.g. 120s, 2m, 500ms).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Tear everything down and exit once every node showed --wait-for.
    #[arg(long, requires = "wait_for")]
    pub exit_when_ready: bool,
    /// The guests: QEMU, its machine and the disk's queues.
    #[command(flatten)]
    pub machine: MachineArgs,
    /// OVMF variable store template, copied to a node's directory once.
    #[arg(long, default_value = DEFAULT_OVMF_VARS, value_name = "FILE")]
    pub ovmf_vars: PathBuf,
    /// Do not copy consoles and backend logs to stderr (the node
    /// directories still get them).
    #[arg(long)]
    pub quiet: bool,
    /// Serve payload bytes without checking them against the image's chunk
    /// hashes (passes --no-verify to every node's `ociblk serve`).
    #[arg(long)]
    pub no_verify: bool,
    /// Connect the nodes to one virtual Ethernet segment (a UDP multicast
    /// group on 127.0.0.1 joined by every QEMU; nothing leaves the machine).
    /// Each node's MAC is 52:54:00 and three bytes of SHA-256 of its name;
    /// the sample guest takes `10.77.<5th MAC byte>.<6th MAC byte>/16`.
    #[arg(long)]
    pub network: bool,
    /// Also give every node a NIC on QEMU's user-mode network (NAT to the
    /// host; the sample guest takes 10.0.2.15/24 with 10.0.2.2 as gateway).
    /// Implies --network.
    #[arg(long)]
    pub uplink: bool,
    /// Give every node a TPM 2.0: one `swtpm socket` per node, its state in
    /// `<state-dir>/<node>/tpm`, started before QEMU and stopped after it.
    #[arg(long)]
    pub tpm: bool,
    /// swtpm binary (for --tpm).
    #[arg(long, default_value = DEFAULT_SWTPM_BINARY, value_name = "PATH")]
    pub swtpm: PathBuf,
    /// Extra `ociblk serve` arguments for every node: layout options,
    /// --flush unsafe, ... (checked as `ociblk serve` checks them before
    /// any node starts). `--record-access FILE` gives each node a record
    /// of its own: FILE, a dot and the node's name (boot.access.node-1, ...);
    /// `--prefetch FILE` gives every node the same record.
    #[arg(last = true, value_name = "SERVE_ARGS")]
    pub serve_args: Vec<String>,
}

pub fn run(args: &LaunchArgs) -> Result<()> {
    let shutdown = ShutdownSignal::new()?;
    shutdown.trigger_on_termination_signals()?;

    // Refused before anything boots, not after.
    if let Some(snapshot_dir) = &args.save
        && std::fs::read_dir(snapshot_dir).is_ok_and(|mut d| d.next().is_some())
    {
        bail!(
            "--save {}: the directory exists and is not empty; a snapshot goes into a new directory",
            snapshot_dir.display()
        );
    }
    let Plan {
        spec,
        running,
        fork,
    } = plan(args, &shutdown)?;
    let launched = spec.clone();
    let mut cluster = match Cluster::launch(spec) {
        Ok(cluster) => cluster,
        Err(LaunchError::Cancelled) => {
            info!("interrupted while launching; everything stopped");
            return Ok(());
        }
        Err(e) => return Err(e).context("launching the cluster"),
    };
    // The fork runs: its directories now hold its nodes' state.
    if let Some(fork) = fork {
        fork.keep();
    }
    if let Some(pattern) = args.wait_for.as_ref().filter(|_| running.is_none()) {
        match cluster.wait_all_for_console(pattern, args.timeout) {
            Ok(_) => {}
            Err(LaunchError::Cancelled) => {
                print_times(&cluster, args.wait_for.as_deref())?;
                return stop(cluster);
            }
            // Dropping the cluster on the way out tears it down.
            Err(e) => return Err(e).context("waiting for the nodes"),
        }
    }
    print_times(&cluster, args.wait_for.as_deref())?;
    if let Some(snapshot_dir) = &args.save {
        return save(cluster, &launched, snapshot_dir, args);
    }
    if args.exit_when_ready {
        return stop(cluster);
    }
    watch(cluster, &shutdown)
}

/// What a launch starts.
struct Plan {
    spec: ClusterSpec,
    /// The machine a running snapshot's VM states need.
    running: Option<RunningMachine>,
    /// A fork's node directories, removed again (after everything started
    /// in them was stopped) if the launch fails or is interrupted.
    fork: Option<Fork>,
}

/// The cluster to launch, from the command line or from `--from`'s
/// snapshot; every node's serve arguments are checked (and a fork's
/// directories made) before anything starts.
fn plan(args: &LaunchArgs, shutdown: &ShutdownSignal) -> Result<Plan> {
    let (mut spec, snapshot) = match (&args.from, &args.image) {
        (Some(snapshot_dir), _) => {
            let snapshot = snapshot::load(snapshot_dir)?;
            let spec = snapshot
                .cluster_spec(&args.state_dir)
                .context("choosing a UDP port for the cluster network")?;
            (spec, Some((snapshot_dir, snapshot)))
        }
        (None, Some(image)) => (new_cluster(args, image)?, None),
        (None, None) => bail!("--image or --from is needed"),
    };
    let running = snapshot.as_ref().and_then(|(_, saved)| saved.running);
    configure(&mut spec, args, running, shutdown)?;
    render_serve_args(&mut spec, args.no_verify)?;
    let fork = match snapshot {
        Some((snapshot_dir, snapshot)) => Some(
            snapshot::prepare_fork(&snapshot, snapshot_dir, &args.state_dir)
                .with_context(|| format!("forking {}", snapshot_dir.display()))?,
        ),
        None => None,
    };
    Ok(Plan {
        spec,
        running,
        fork,
    })
}

/// A new cluster of `--nodes` nodes of `image`.
fn new_cluster(args: &LaunchArgs, image: &Path) -> Result<ClusterSpec> {
    let count = usize::try_from(args.nodes).context("too many nodes")?;
    let mut serve_args = Vec::new();
    let image = if image.is_dir() {
        image.to_owned()
    } else {
        // Resolve a tag once for the whole cluster: every node gets the
        // same image even if the tag moves while nodes start.
        let loaded = open_image(image, &args.registry.settings())?;
        serve_args = registry_serve_args(&args.registry);
        loaded.origin
    };
    let mut spec = ClusterSpec::new(
        &image,
        &args.state_dir,
        NodeSpec::numbered(&args.name_prefix, count),
    );
    serve_args.extend(args.serve_args.iter().cloned());
    spec.serve_args = serve_args;
    spec.queues = args.machine.queues;
    Ok(spec)
}

/// Sets what the command line says of the machine, the consoles, the TPM
/// and the network; a running snapshot keeps its memory size and vCPUs.
fn configure(
    spec: &mut ClusterSpec,
    args: &LaunchArgs,
    running: Option<RunningMachine>,
    shutdown: &ShutdownSignal,
) -> Result<()> {
    let machine = &args.machine;
    spec.qemu = QemuSpec {
        binary: machine.qemu.clone(),
        accel: machine.accel.clone(),
        memory_mib: machine.memory,
        cpus: machine.cpus,
        ovmf_code: machine.ovmf_code.clone(),
        ovmf_vars_template: args.ovmf_vars.clone(),
        extra_args: machine.qemu_args.clone(),
    };
    if let Some(saved) = running {
        spec.qemu.memory_mib = saved.memory_mib;
        spec.qemu.cpus = saved.cpus;
    }
    spec.echo = !args.quiet;
    spec.cancel = Some(shutdown.clone());
    if args.tpm {
        spec.tpm = Some(TpmSpec::default());
    }
    if let Some(tpm) = spec.tpm.as_mut() {
        tpm.binary = args.swtpm.clone();
    }
    if args.network || args.uplink {
        spec.network = Some(
            NetworkSpec::on_loopback(args.uplink)
                .context("choosing a UDP port for the cluster network")?,
        );
    }
    Ok(())
}

/// Gives every node the arguments its `ociblk serve` runs with
/// ([`NodeSpec::rendered_serve_args`]): those the harness sets, the
/// cluster's and the node's own, parsed with serve's own definitions (a
/// bad option fails the launch here, before anything starts, with clap's
/// message), with what launch changes set on serve's typed options, and
/// written back by [`ServeArgs::to_args`]. A `--record-access FILE`
/// becomes `FILE.<node>`, so that each node keeps the record of its own
/// boot rather than every server writing one file, the last to stop
/// winning (`--prefetch FILE` stays: one record may serve every node).
///
/// `no_verify` (launch's `--no-verify`) turns verification off for every
/// node; the cluster's serve arguments, which a snapshot records, then say
/// `--no-verify` too (unless they did already), so that its forks serve
/// unchecked as well.
fn render_serve_args(spec: &mut ClusterSpec, no_verify: bool) -> Result<()> {
    spec.make_paths_absolute()
        .with_context(|| format!("resolving {}", spec.state_dir.display()))?;
    let mut verified = false;
    let mut rendered = Vec::with_capacity(spec.nodes.len());
    for node in &spec.nodes {
        let mut serve = ServeArgs::try_parse_args(spec.node_serve_args(node)).map_err(|e| {
            anyhow!(
                "node {}: ociblk serve refuses its arguments (after --, or in the snapshot's \
                 cluster.json): {}",
                node.name,
                clap_message(&e)
            )
        })?;
        verified |= !serve.no_verify;
        serve.no_verify |= no_verify;
        if let Some(file) = serve.record_access.as_mut() {
            file.as_mut_os_string().push(format!(".{}", node.name));
        }
        rendered.push(serve.to_args());
    }
    for (node, args) in spec.nodes.iter_mut().zip(rendered) {
        node.rendered_serve_args = Some(args);
    }
    if no_verify && verified {
        spec.serve_args.push("--no-verify".into());
    }
    Ok(())
}

/// clap's message for `e`, without the `error: ` it starts with and the
/// pointer to `--help` it ends with (the help of `ociblk serve`, not of
/// the command that failed).
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    let text = text
        .split("\n\nFor more information")
        .next()
        .unwrap_or(text);
    text.trim_end().to_owned()
}

/// Keeps the cluster running until a signal or until every guest exited.
fn watch(mut cluster: Cluster, shutdown: &ShutdownSignal) -> Result<()> {
    info!(
        state_dir = %cluster.state_dir().display(),
        "cluster running; Ctrl-C or SIGTERM stops it"
    );
    while !shutdown.is_triggered() {
        for (node, status) in cluster.poll_exits() {
            info!(node, "QEMU exited ({status})");
        }
        cluster.restart_dead_servers()?;
        if cluster.running_guests() == 0 {
            info!("every guest has exited");
            break;
        }
        thread::sleep(MONITOR_INTERVAL);
    }
    stop(cluster)
}

/// Saves the cluster into `snapshot_dir`: with `--live` running (the
/// guests paused and their VM states saved), else powered off; either way
/// everything is stopped.
fn save(
    mut cluster: Cluster,
    spec: &ClusterSpec,
    snapshot_dir: &Path,
    args: &LaunchArgs,
) -> Result<()> {
    let (saved, how) = if args.live {
        info!("pausing the guests and saving their VM states");
        let saved =
            snapshot::save_live(cluster, spec, snapshot_dir, args.timeout).with_context(|| {
                format!("saving the running cluster into {}", snapshot_dir.display())
            })?;
        (saved, "saved running")
    } else {
        info!("powering the guests off");
        cluster
            .power_off(POWER_OFF_COMMAND, args.timeout)
            .context("powering the guests off for --save")?;
        stop(cluster)?;
        let saved = snapshot::save(spec, snapshot_dir)
            .with_context(|| format!("saving the cluster into {}", snapshot_dir.display()))?;
        (saved, "saved")
    };
    info!(
        snapshot = %snapshot_dir.display(),
        nodes = saved.nodes.len(),
        "{how}; fork it with ociblk launch --from SNAPDIR --state-dir NEW"
    );
    Ok(())
}

fn stop(cluster: Cluster) -> Result<()> {
    info!("stopping the cluster");
    cluster.shutdown().context("tearing the cluster down")?;
    info!("stopped");
    Ok(())
}

/// Prints each node's launch milestones, in seconds from the start.
fn print_times(cluster: &Cluster, pattern: Option<&str>) -> Result<()> {
    let seconds = |d: Option<Duration>| {
        d.map_or_else(|| "-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
    };
    let name_width = cluster
        .nodes()
        .iter()
        .map(|n| n.name().len())
        .chain(["node".len()])
        .max()
        .unwrap_or_default();
    let resumed = cluster.nodes().iter().any(|n| n.times().resumed.is_some());
    let console_header = if resumed {
        "resumed".to_owned()
    } else {
        pattern.map_or_else(|| "console".to_owned(), |p| format!("{p:?}"))
    };
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "{:<name_width$}  {:>13}  {:>12}  {:>w$}",
        "node",
        "backend ready",
        "QEMU started",
        console_header,
        w = console_header.len().max(8),
    )?;
    for node in cluster.nodes() {
        let t = node.times();
        writeln!(
            out,
            "{:<name_width$}  {:>13}  {:>12}  {:>w$}",
            node.name(),
            seconds(t.backend_ready),
            seconds(t.qemu_started),
            seconds(if resumed { t.resumed } else { t.console_ready }),
            w = console_header.len().max(8),
        )?;
    }
    out.flush()?;
    Ok(())
}

/// QEMU and its machine, for `launch` and `qemu-command`.
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// QEMU binary.
    #[arg(long, default_value = DEFAULT_QEMU_BINARY, value_name = "PATH")]
    pub qemu: PathBuf,
    /// QEMU accelerator.
    #[arg(long, default_value = DEFAULT_ACCEL)]
    pub accel: String,
    /// Guest memory per node (K/M/G suffixes; whole MiB).
    #[arg(long, default_value = "512M", value_parser = parse_memory, value_name = "SIZE")]
    pub memory: u32,
    /// vCPUs per node.
    #[arg(long, default_value_t = DEFAULT_CPUS, value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus: u32,
    /// Request queues per disk.
    #[arg(long, default_value_t = DEFAULT_QUEUES,
          value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_QUEUES)))]
    pub queues: u16,
    /// OVMF firmware code.
    #[arg(long, default_value = DEFAULT_OVMF_CODE, value_name = "FILE")]
    pub ovmf_code: PathBuf,
    /// Extra QEMU argument (repeatable), e.g. --qemu-arg=-no-reboot.
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
}

/// The registry options as every node's `ociblk serve` gets them (and a
/// snapshot records them), paths made absolute: each node reaches the
/// registry and its mirrors as the tag was resolved. `--fetch-timeout` is
/// always among them, `--allow-insecure-cache-dir` never.
fn registry_serve_args(r: &RegistryArgs) -> Vec<String> {
    let absolute = |path: &Option<PathBuf>| {
        path.as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
    };
    let nodes = RegistryArgs {
        cache: absolute(&r.cache),
        cert_dir: absolute(&r.cert_dir),
        registries_conf: absolute(&r.registries_conf),
        allow_insecure_cache_dir: false,
        ..r.clone()
    };
    let mut line = CommandLine::default();
    nodes.write_args(&mut line);
    line.into_args()
        .iter()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect()
}

/// Guest memory in MiB.
fn parse_memory(s: &str) -> Result<u32, String> {
    let bytes = parse_size(s)?;
    if bytes == 0 || bytes % MIB != 0 {
        return Err(format!(
            "memory {s:?} must be a positive number of whole MiB"
        ));
    }
    u32::try_from(bytes / MIB).map_err(|_| format!("memory {s:?} is too large"))
}

/// A duration as `120s`, `2m`, `500ms`, `1h` or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 120s, 2m or 500ms"))?;
    let seconds = |factor: u64| {
        n.checked_mul(factor)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("invalid duration {s:?}: too long"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => seconds(1),
        "m" | "min" => seconds(60),
        "h" => seconds(3600),
        other => Err(format!(
            "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m or h)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::serve_args::FlushArg;
    use super::*;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        launch: LaunchArgs,
    }

    #[test]
    fn durations_and_memory() {
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        parse_duration("s").unwrap_err();
        parse_duration("3d").unwrap_err();
        assert_eq!(parse_memory("512M"), Ok(512));
        assert_eq!(parse_memory("1G"), Ok(1024));
        parse_memory("1000K").unwrap_err();
        parse_memory("0").unwrap_err();
    }

    #[test]
    fn defaults_and_serve_args() {
        let c = Cmd::parse_from([
            "x",
            "--image",
            "img",
            "--state-dir",
            "st",
            "--nodes",
            "3",
            "--qemu-arg=-no-reboot",
            "--",
            "--flush",
            "unsafe",
        ]);
        let a = c.launch;
        assert_eq!((a.nodes, a.name_prefix.as_str()), (3, "node"));
        let m = &a.machine;
        assert_eq!((m.memory, m.cpus, m.queues), (512, 1, 2));
        assert_eq!(m.accel, "tcg");
        assert_eq!(a.timeout, Duration::from_secs(120));
        assert_eq!(m.qemu_args, ["-no-reboot"]);
        assert_eq!(a.serve_args, ["--flush", "unsafe"]);
        assert!(!a.exit_when_ready);
        assert!(!a.no_verify, "payloads are verified by default");
    }

    #[test]
    fn registry_options_reach_every_nodes_serve() {
        let registry = [
            "--cache",
            "/c",
            "--insecure-registry",
            "h.example",
            "--cert-dir",
            "/certs",
            "--registries-conf",
            "/r.conf",
            "--fetch-timeout",
            "7",
        ];
        let c = Cmd::parse_from(
            ["x", "--image", "r.example/os:1", "--state-dir", "s"]
                .into_iter()
                .chain(registry)
                .chain(["--allow-insecure-cache-dir"]),
        );
        // What a snapshot records: each option as given (paths absolute),
        // `--name value`, but --allow-insecure-cache-dir.
        assert_eq!(registry_serve_args(&c.launch.registry), registry);
    }

    /// A two-node spec under `/state` with the cluster's serve arguments
    /// `serve_args`.
    fn two_nodes(serve_args: &[&str]) -> ClusterSpec {
        let mut spec = ClusterSpec::new("/img", "/state", NodeSpec::numbered("node", 2));
        spec.serve_args = serve_args.iter().map(|a| (*a).to_owned()).collect();
        spec
    }

    /// The options node `i`'s server runs with.
    fn node_options(spec: &ClusterSpec, i: usize) -> ServeArgs {
        let rendered = spec.nodes[i].rendered_serve_args.as_ref().unwrap();
        ServeArgs::try_parse_args(rendered).unwrap()
    }

    #[test]
    fn each_node_records_its_accesses_to_a_file_of_its_own() {
        for record in [
            &["--record-access", "/r/boot.access"][..],
            &["--record-access=/r/boot.access"],
        ] {
            let mut spec = two_nodes(&[&["--flush", "unsafe"][..], record].concat());
            spec.nodes[1].serve_args = vec!["--prefetch".into(), "/r/boot.access".into()];
            render_serve_args(&mut spec, false).unwrap();
            let (one, two) = (node_options(&spec, 0), node_options(&spec, 1));
            assert_eq!(one.record_access, Some("/r/boot.access.node-1".into()));
            assert_eq!(two.record_access, Some("/r/boot.access.node-2".into()));
            // One record may serve every node's prefetch.
            assert_eq!(two.prefetch, Some("/r/boot.access".into()));
            assert_eq!(one.prefetch, None);
            assert_eq!(two.flush, FlushArg::Unsafe);
            assert_eq!(two.layout.seed, "node-2");
            assert_eq!(two.socket, Path::new("/state/node-2/node.sock"));
            assert_eq!(two.overlay, Some("/state/node-2/node.overlay".into()));
            assert!(!two.no_verify);
            // What a snapshot records stays as it was given.
            assert_eq!(
                spec.serve_args,
                [&["--flush", "unsafe"][..], record].concat()
            );
        }
    }

    #[test]
    fn no_verify_reaches_every_node_and_the_record_once() {
        let mut spec = two_nodes(&["--flush", "unsafe"]);
        render_serve_args(&mut spec, true).unwrap();
        assert!(node_options(&spec, 0).no_verify && node_options(&spec, 1).no_verify);
        assert_eq!(spec.serve_args, ["--flush", "unsafe", "--no-verify"]);

        let mut spec = two_nodes(&["--no-verify"]);
        render_serve_args(&mut spec, true).unwrap();
        assert!(node_options(&spec, 1).no_verify);
        assert_eq!(spec.serve_args, ["--no-verify"]);
    }

    #[test]
    fn a_serve_argument_serve_refuses_fails_the_launch_naming_it() {
        for (bad, want) in [
            (&["--flsh", "unsafe"][..], "--flsh"),
            (&["--record-accesses", "x"], "--record-accesses"),
            (&["--record-access"], "--record-access"),
            // Set by the harness for every node.
            (&["--seed", "other"], "--seed"),
        ] {
            let mut spec = two_nodes(bad);
            let err = format!("{:#}", render_serve_args(&mut spec, false).unwrap_err());
            assert!(err.contains("node node-1") && err.contains(want), "{err}");
            assert!(spec.nodes.iter().all(|n| n.rendered_serve_args.is_none()));
        }
        let mut spec = two_nodes(&[]);
        spec.nodes[1].serve_args = vec!["--disk-size".into(), "lots".into()];
        let err = format!("{:#}", render_serve_args(&mut spec, false).unwrap_err());
        assert!(
            err.contains("node node-2") && err.contains("--disk-size"),
            "{err}"
        );
    }

    #[test]
    fn no_verify_is_a_launch_option() {
        let c = Cmd::parse_from(["x", "--image", "i", "--state-dir", "s", "--no-verify"]);
        assert!(c.launch.no_verify);
        assert!(c.launch.serve_args.is_empty());
    }

    #[test]
    fn save_needs_a_pattern_and_from_replaces_the_cluster_options() {
        let save = ["x", "--image", "i", "--state-dir", "s", "--save", "snap"];
        assert!(
            Cmd::try_parse_from(save).is_err(),
            "--save without --wait-for"
        );
        let c = Cmd::parse_from(save.into_iter().chain(["--wait-for", "ready", "--tpm"]));
        assert_eq!(c.launch.save.as_deref(), Some(Path::new("snap")));
        assert!(c.launch.tpm && !c.launch.network);

        let c = Cmd::parse_from(["x", "--from", "snap", "--state-dir", "f"]);
        assert_eq!(c.launch.from.as_deref(), Some(Path::new("snap")));
        assert_eq!(c.launch.image, None);
        for clash in [
            &["--image", "i"][..],
            &["--nodes", "2"],
            &["--tpm"],
            &["--network"],
            &["--", "--flush", "unsafe"],
        ] {
            let args = ["x", "--from", "snap", "--state-dir", "f"];
            let r = Cmd::try_parse_from(args.into_iter().chain(clash.iter().copied()));
            assert!(r.is_err(), "--from with {clash:?}");
        }
        let r = Cmd::try_parse_from(["x", "--state-dir", "f"]);
        assert!(r.is_err(), "neither --image nor --from");
        let r = Cmd::try_parse_from(["x", "--image", "i", "--state-dir", "s", "--live"]);
        assert!(r.is_err(), "--live without --save");
        let c = Cmd::parse_from(save.into_iter().chain(["--wait-for", "ready", "--live"]));
        assert!(c.launch.live);
    }

    #[test]
    fn exit_when_ready_needs_a_pattern() {
        let r = Cmd::try_parse_from(["x", "--image", "i", "--state-dir", "s", "--exit-when-ready"]);
        r.unwrap_err();
    }
}
