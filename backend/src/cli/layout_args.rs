//! Options that describe the node disk, shared by every command.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ociblk_layout::{DiskParams, Guid, Layout, parse_size};
use ociblk_registry::Options;
use ociblk_registry::cache::DirPolicy;
use ociblk_registry::mirrors::ConfSource;
use ociblk_registry::tls::CertDirs;

use super::command_line::CommandLine;
use crate::image_source::{LoadedImage, RegistrySettings, open_image};

/// How registry images are reached and where their chunks are cached.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct RegistryArgs {
    /// Host cache for registry images, shared by every ociblk process on
    /// the host [default: /var/cache/ociblk as root, else
    /// $XDG_CACHE_HOME/ociblk or ~/.cache/ociblk].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Reach this registry (HOST or HOST:PORT) over plain HTTP when it
    /// does not speak HTTPS, although it is not a loopback address
    /// (repeatable). HTTPS is always tried first; loopback registries may
    /// fall back to HTTP too.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// Read CA certificates (*.crt) and the client certificate (*.cert
    /// with its *.key) from DIR for every registry, instead of
    /// HOST[:PORT] under /etc/containers/certs.d or /etc/docker/certs.d
    /// (as skopeo's --cert-dir).
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Read mirrors, blocked and insecure registries from FILE alone,
    /// instead of /etc/containers/registries.conf and its
    /// registries.conf.d/*.conf (as skopeo's --registries-conf).
    #[arg(long, value_name = "FILE")]
    pub registries_conf: Option<PathBuf>,
    /// Seconds fetching the chunks one read needs may take (they are
    /// fetched side by side), waiting and retries included; a guest read
    /// whose chunks are not fetched in time gets an I/O error.
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub fetch_timeout: u64,
    /// Use an existing cache directory although another user owns it or
    /// group or others may write it (refused otherwise: whoever can write
    /// the cache can plant files in it).
    #[arg(long)]
    pub allow_insecure_cache_dir: bool,
}

impl RegistryArgs {
    pub fn settings(&self) -> RegistrySettings {
        RegistrySettings {
            cache: self.cache.clone(),
            options: Options {
                insecure_registries: self.insecure_registries.clone(),
                chunk_timeout: Duration::from_secs(self.fetch_timeout),
                cache_dir: DirPolicy {
                    allow_insecure: self.allow_insecure_cache_dir,
                },
                cert_dirs: match &self.cert_dir {
                    Some(dir) => CertDirs::Fixed(dir.clone()),
                    None => CertDirs::System,
                },
                registries_conf: match &self.registries_conf {
                    Some(file) => ConfSource::File(file.clone()),
                    None => ConfSource::System,
                },
                ..Options::default()
            },
        }
    }

    /// Writes these options as the arguments that give them, in the order
    /// `ociblk launch` records them for every node's `ociblk serve`.
    pub fn write_args(&self, line: &mut CommandLine) {
        line.optional("--cache", self.cache.as_ref());
        line.repeated("--insecure-registry", &self.insecure_registries);
        line.optional("--cert-dir", self.cert_dir.as_ref());
        line.optional("--registries-conf", self.registries_conf.as_ref());
        line.option("--fetch-timeout", self.fetch_timeout.to_string());
        line.flag("--allow-insecure-cache-dir", self.allow_insecure_cache_dir);
    }
}

/// The OS image argument, with the options for registry images.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ImageArgs {
    /// OS image: an OCI image layout directory in Monogon's format, or a
    /// registry reference HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]. An
    /// existing directory always wins; write ./NAME for a directory whose
    /// name looks like a reference.
    #[arg(long, value_name = "DIR|REF")]
    pub image: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

impl ImageArgs {
    /// Opens the image (for a registry image: resolves its tag once and
    /// opens its manifest and config, from the cache when offline).
    pub fn open(&self) -> Result<LoadedImage> {
        Ok(open_image(&self.image, &self.registry.settings())?)
    }
}

/// Which node disk to compute from which image.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct LayoutArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Seed (usually the node name) that the disk's GUIDs and FAT volume ID
    /// are derived from: same seed, same disk.
    #[arg(long, default_value = "node")]
    pub seed: String,
    /// Disk size (bytes, or with K/M/G/T or KiB/MiB/GiB/TiB suffix).
    #[arg(long, value_parser = parse_size, default_value = "5GiB", value_name = "SIZE")]
    pub disk_size: u64,
    /// Size of the EFI system partition.
    #[arg(long, value_parser = parse_size, default_value = "128MiB", value_name = "SIZE")]
    pub esp_size: u64,
    /// Size of each system partition (A and B).
    #[arg(long, value_parser = parse_size, default_value = "1GiB", value_name = "SIZE")]
    pub system_size: u64,
    /// Leave out the data partition (METROPOLIS-NODE-DATA).
    #[arg(long)]
    pub no_data_partition: bool,
    /// A/B loader placed at EFI/BOOT/BOOTx64.EFI (BOOTAA64.EFI on aarch64).
    /// Without it the kernel payload is placed there and firmware boots it
    /// directly.
    #[arg(long, value_name = "FILE")]
    pub abloader: Option<PathBuf>,
    /// Node parameters placed at metropolis/parameters.pb on the ESP.
    #[arg(long, value_name = "FILE")]
    pub node_parameters: Option<PathBuf>,
    /// Pin the disk GUID instead of deriving it from the seed.
    #[arg(long, value_name = "GUID")]
    pub disk_guid: Option<Guid>,
    /// Pin the ESP's partition GUID.
    #[arg(long, value_name = "GUID")]
    pub esp_guid: Option<Guid>,
    /// Pin system partition A's GUID.
    #[arg(long, value_name = "GUID")]
    pub system_a_guid: Option<Guid>,
    /// Pin system partition B's GUID.
    #[arg(long, value_name = "GUID")]
    pub system_b_guid: Option<Guid>,
    /// Pin the data partition's GUID.
    #[arg(long, value_name = "GUID")]
    pub data_guid: Option<Guid>,
    /// Pin the FAT volume ID (hex with 0x, or decimal).
    #[arg(long, value_parser = parse_u32, value_name = "ID")]
    pub fat_volume_id: Option<u32>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("invalid 32-bit number {s:?} (e.g. 0x12345678)"))
}

impl LayoutArgs {
    pub fn params(&self) -> DiskParams {
        let mut p = DiskParams::new(&self.seed);
        p.disk_size = self.disk_size;
        p.esp_size = self.esp_size;
        p.system_size = self.system_size;
        p.data_partition = !self.no_data_partition;
        p.abloader = self.abloader.clone();
        p.node_parameters = self.node_parameters.clone();
        let ids = &mut p.ids;
        ids.disk = self.disk_guid.unwrap_or(ids.disk);
        ids.esp = self.esp_guid.unwrap_or(ids.esp);
        ids.system_a = self.system_a_guid.unwrap_or(ids.system_a);
        ids.system_b = self.system_b_guid.unwrap_or(ids.system_b);
        ids.data = self.data_guid.unwrap_or(ids.data);
        ids.fat_volume_id = self.fat_volume_id.unwrap_or(ids.fat_volume_id);
        p
    }

    /// Writes these options as the arguments that give them.
    pub fn write_args(&self, line: &mut CommandLine) {
        line.option("--image", &self.image.image);
        self.image.registry.write_args(line);
        line.option("--seed", &self.seed);
        line.option("--disk-size", self.disk_size.to_string());
        line.option("--esp-size", self.esp_size.to_string());
        line.option("--system-size", self.system_size.to_string());
        line.flag("--no-data-partition", self.no_data_partition);
        line.optional("--abloader", self.abloader.as_ref());
        line.optional("--node-parameters", self.node_parameters.as_ref());
        for (option, guid) in [
            ("--disk-guid", self.disk_guid),
            ("--esp-guid", self.esp_guid),
            ("--system-a-guid", self.system_a_guid),
            ("--system-b-guid", self.system_b_guid),
            ("--data-guid", self.data_guid),
        ] {
            line.optional(option, guid.map(|g| g.to_string()));
        }
        line.optional(
            "--fat-volume-id",
            self.fat_volume_id.map(|id| id.to_string()),
        );
    }

    /// Opens the image and computes the layout.
    pub fn load(&self) -> Result<(LoadedImage, Layout)> {
        let loaded = self.image.open()?;
        let layout = Layout::build(&loaded.image, &self.params()).with_context(|| {
            format!(
                "cannot lay out a node disk from {}",
                loaded.origin.display()
            )
        })?;
        Ok((loaded, layout))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use ociblk_layout::disk::{DEFAULT_DISK_SIZE, DEFAULT_ESP_SIZE, DEFAULT_SYSTEM_SIZE};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        layout: LayoutArgs,
    }

    #[test]
    fn defaults_are_the_upstream_test_launcher_sizes() {
        let c = Cmd::parse_from(["x", "--image", "i"]);
        let p = c.layout.params();
        assert_eq!(
            (p.disk_size, p.esp_size, p.system_size, p.data_partition),
            (
                DEFAULT_DISK_SIZE,
                DEFAULT_ESP_SIZE,
                DEFAULT_SYSTEM_SIZE,
                true
            )
        );
        assert_eq!(p.ids, ociblk_layout::DiskIds::from_seed("node"));
    }

    #[test]
    fn registry_options() {
        let c = Cmd::parse_from([
            "x",
            "--image",
            "127.0.0.1:5000/os:v1",
            "--cache",
            "/c",
            "--insecure-registry",
            "a.example",
            "--insecure-registry",
            "b.example:5000",
            "--fetch-timeout",
            "7",
            "--cert-dir",
            "/certs",
            "--registries-conf",
            "/r.conf",
        ]);
        let s = c.layout.image.registry.settings();
        assert_eq!(s.cache, Some(PathBuf::from("/c")));
        assert_eq!(
            s.options.insecure_registries,
            ["a.example", "b.example:5000"]
        );
        assert_eq!(s.options.chunk_timeout, Duration::from_secs(7));
        assert_eq!(s.options.cert_dirs, CertDirs::Fixed("/certs".into()));
        assert_eq!(
            s.options.registries_conf,
            ConfSource::File("/r.conf".into())
        );
        let d = Cmd::parse_from(["x", "--image", "i"]).layout.image.registry;
        assert_eq!(d.settings().options.chunk_timeout, Duration::from_secs(30));
        Cmd::try_parse_from(["x", "--image", "i", "--fetch-timeout", "0"]).unwrap_err();
    }

    #[test]
    fn pinned_ids_override_the_seed() {
        let c = Cmd::parse_from([
            "x",
            "--image",
            "i",
            "--seed",
            "n1",
            "--data-guid",
            "D1111111-2222-4333-8444-555555555555",
            "--fat-volume-id",
            "0x00c0ffee",
        ]);
        let p = c.layout.params();
        assert_eq!(
            p.ids.data.to_string(),
            "D1111111-2222-4333-8444-555555555555"
        );
        assert_eq!(p.ids.fat_volume_id, 0x00C0_FFEE);
        assert_eq!(p.ids.disk, ociblk_layout::DiskIds::from_seed("n1").disk);
    }
}
