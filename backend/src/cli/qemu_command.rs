//! `ociblk qemu-command`: the QEMU command line `ociblk launch` would run
//! for one node, printed for scripts that start QEMU themselves.

use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::launch::MachineArgs;
use ociblk_launch::{QemuBoot, QemuCommand, QemuDisk, Reconnect, qemu_version};

#[derive(Debug, Args)]
pub struct QemuCommandArgs {
    /// The vhost-user socket of the node's `ociblk serve`.
    #[arg(long, value_name = "PATH", required_unless_present = "image")]
    pub socket: Option<PathBuf>,
    /// Reconnect to a restarted backend, as `ociblk launch` does: printed as
    /// `reconnect-ms=1000` for a QEMU (--qemu) of 9.2 or later, else
    /// `reconnect=1`.
    #[arg(long, requires = "socket")]
    pub reconnect: bool,
    /// Instead of a socket: boot QEMU's own virtio-blk from this image file
    /// (writes are not flushed to it), for comparisons.
    #[arg(long, value_name = "FILE", conflicts_with = "socket")]
    pub image: Option<PathBuf>,
    /// Format of --image (raw, qcow2, ...).
    #[arg(long, default_value = "raw", requires = "image")]
    pub image_format: String,
    /// The node's own writable copy of the OVMF variable store.
    #[arg(long, value_name = "FILE")]
    pub ovmf_vars: PathBuf,
    /// QEMU's -name.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub machine: MachineArgs,
}

impl QemuCommandArgs {
    fn command(&self) -> Result<QemuCommand> {
        let disk = match (&self.socket, &self.image) {
            (Some(socket), _) => QemuDisk::VhostUser {
                socket: socket.clone(),
                reconnect: if self.reconnect {
                    Reconnect::for_qemu(qemu_version(&self.machine.qemu))
                } else {
                    Reconnect::Off
                },
            },
            (None, Some(path)) => QemuDisk::Image {
                path: path.clone(),
                format: self.image_format.clone(),
            },
            (None, None) => bail!("--socket or --image is required"),
        };
        let machine = &self.machine;
        Ok(QemuCommand {
            binary: machine.qemu.clone(),
            name: self.name.clone(),
            accel: machine.accel.clone(),
            cpus: machine.cpus,
            memory_mib: machine.memory,
            disk,
            queues: machine.queues,
            boot: QemuBoot::Uefi {
                code: machine.ovmf_code.clone(),
                vars: self.ovmf_vars.clone(),
            },
            network: None,
            tpm_socket: None,
            extra_args: machine.qemu_args.clone(),
        })
    }
}

/// Prints the binary and each argument on a line of its own.
pub fn run(args: &QemuCommandArgs) -> Result<()> {
    let cmd = args.command()?;
    let mut out = io::stdout().lock();
    for arg in std::iter::once(cmd.binary.as_os_str().to_owned()).chain(cmd.args()) {
        out.write_all(arg.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush().context("writing to stdout")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        args: QemuCommandArgs,
    }

    #[test]
    fn a_socket_or_an_image_but_not_both() {
        let parse = |argv: &[&str]| {
            Cmd::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
                .map(|c| c.args.command().unwrap())
        };
        let cmd = parse(&["--socket", "/s", "--ovmf-vars", "/v", "--cpus", "2"]).unwrap();
        assert_eq!(
            cmd.disk,
            QemuDisk::VhostUser {
                socket: "/s".into(),
                reconnect: Reconnect::Off
            }
        );
        assert_eq!(cmd.cpus, 2);
        assert_eq!(cmd.memory_mib, 512);
        let cmd = parse(&[
            "--image",
            "/i",
            "--image-format",
            "qcow2",
            "--ovmf-vars",
            "/v",
        ])
        .unwrap();
        assert_eq!(
            cmd.disk,
            QemuDisk::Image {
                path: "/i".into(),
                format: "qcow2".into()
            }
        );
        parse(&["--ovmf-vars", "/v"]).unwrap_err();
        parse(&["--socket", "/s", "--image", "/i", "--ovmf-vars", "/v"]).unwrap_err();
        parse(&["--socket", "/s"]).unwrap_err();
    }
}
