//! The QEMU command line of a node: a q35 machine whose memory a vhost-user
//! backend can map, one virtio-blk boot disk, the serial console on stdio
//! and nothing else. `ociblk launch`, the tests and (through
//! `ociblk qemu-command`) the scripts all start QEMU from here.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{DEFAULT_ACCEL, DEFAULT_CPUS, DEFAULT_MEMORY_MIB, DEFAULT_QEMU_BINARY, DEFAULT_QUEUES};

/// QEMU ids of the guest memory backend and of the disk.
const MEMORY_ID: &str = "mem";
const DISK_ID: &str = "disk0";
/// QEMU ids of the cluster network and the user-mode uplink.
const CLUSTER_NETDEV_ID: &str = "cluster";
const UPLINK_NETDEV_ID: &str = "uplink";
/// QEMU ids of the TPM's chardev and backend.
const TPM_CHARDEV_ID: &str = "chrtpm";
const TPM_ID: &str = "tpm0";

/// The guest's NIC on a cluster network (a QEMU socket netdev, multicast on
/// loopback) and, optionally, a second NIC with user-mode networking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuNetwork {
    /// Multicast group and port, e.g. `239.255.1.2:5000`.
    pub group: String,
    pub mac: String,
    /// MAC of the uplink NIC, if the guest has one.
    pub uplink_mac: Option<String>,
}

impl QemuNetwork {
    /// The NIC on the cluster network and, if any, the uplink's.
    fn args(&self) -> Vec<OsString> {
        // romfile= (empty): no iPXE option ROM, OVMF boots the disk
        // without trying the network first.
        let mut args: Vec<OsString> = vec![
            "-netdev".into(),
            format!(
                "socket,id={CLUSTER_NETDEV_ID},mcast={},localaddr=127.0.0.1",
                self.group
            )
            .into(),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev={CLUSTER_NETDEV_ID},mac={},romfile=",
                self.mac
            )
            .into(),
        ];
        if let Some(mac) = &self.uplink_mac {
            args.extend([
                "-netdev".into(),
                format!("user,id={UPLINK_NETDEV_ID}").into(),
                "-device".into(),
                format!("virtio-net-pci,netdev={UPLINK_NETDEV_ID},mac={mac},romfile=").into(),
            ]);
        }
        args
    }
}

/// A TPM 2.0 whose emulator (swtpm) listens on the control socket `socket`.
fn tpm_args(socket: &Path) -> [OsString; 6] {
    [
        "-chardev".into(),
        option_value(&format!("socket,id={TPM_CHARDEV_ID},path="), socket),
        "-tpmdev".into(),
        format!("emulator,id={TPM_ID},chardev={TPM_CHARDEV_ID}").into(),
        "-device".into(),
        format!("tpm-tis,tpmdev={TPM_ID}").into(),
    ]
}

/// Whether and how QEMU reconnects to a vhost-user backend that went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Never: a backend that exits ends the disk.
    Off,
    /// Every second, as QEMU before 9.2 spells it (`reconnect=1`).
    Seconds,
    /// Every second, as QEMU 9.2 and later spell it (`reconnect-ms=1000`;
    /// `reconnect` is deprecated there).
    Millis,
}

impl Reconnect {
    /// The reconnect option a QEMU of `version` (major, minor) takes; an
    /// unknown version gets the spelling every QEMU before 9.2 knows.
    pub fn for_qemu(version: Option<(u32, u32)>) -> Reconnect {
        match version {
            Some(v) if v >= (9, 2) => Reconnect::Millis,
            _ => Reconnect::Seconds,
        }
    }

    /// The `-chardev socket` option, if any.
    fn chardev_option(self) -> Option<&'static str> {
        match self {
            Reconnect::Off => None,
            Reconnect::Seconds => Some(",reconnect=1"),
            Reconnect::Millis => Some(",reconnect-ms=1000"),
        }
    }
}

/// The version of the QEMU at `binary` (`QEMU emulator version X.Y.Z`), if
/// it runs and says.
pub fn qemu_version(binary: &Path) -> Option<(u32, u32)> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("QEMU emulator version ").nth(1)?;
    let mut parts = rest
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

/// The guest's boot disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuDisk {
    /// A vhost-user-blk device on a backend's Unix socket.
    VhostUser {
        socket: PathBuf,
        /// Whether QEMU reconnects to a backend that restarts.
        reconnect: Reconnect,
    },
    /// QEMU's own virtio-blk on an image file, for comparisons. Writes are
    /// never flushed to the file (`cache=unsafe`): a throwaway disk.
    Image { path: PathBuf, format: String },
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuBoot {
    /// OVMF from the disk's ESP; `vars` is the node's own writable copy of
    /// the variable store.
    Uefi { code: PathBuf, vars: PathBuf },
    /// QEMU loads a kernel and initramfs directly; the console is ttyS0.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        /// Kernel arguments after `console=ttyS0 panic=-1`.
        append: String,
    },
}

/// Everything that goes into one QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand {
    pub binary: PathBuf,
    /// `-name`, if any.
    pub name: Option<String>,
    /// `-accel` value.
    pub accel: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk: QemuDisk,
    /// Request queues of the disk.
    pub queues: u16,
    pub boot: QemuBoot,
    pub network: Option<QemuNetwork>,
    /// The control socket of the guest's swtpm, if it has a TPM.
    pub tpm_socket: Option<PathBuf>,
    /// Appended to the command line.
    pub extra_args: Vec<String>,
}

impl QemuCommand {
    /// A command with the default binary, accelerator, vCPUs, memory and queues.
    pub fn new(disk: QemuDisk, boot: QemuBoot) -> Self {
        QemuCommand {
            binary: DEFAULT_QEMU_BINARY.into(),
            name: None,
            accel: DEFAULT_ACCEL.into(),
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            disk,
            queues: DEFAULT_QUEUES,
            boot,
            network: None,
            tpm_socket: None,
            extra_args: Vec::new(),
        }
    }

    /// The arguments after the binary.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = self.machine_args();
        args.extend(self.disk_args());
        args.extend(
            [
                "-display",
                "none",
                "-serial",
                "stdio",
                "-monitor",
                "none",
                "-nodefaults",
            ]
            .map(OsString::from),
        );
        args.extend(self.boot_args());
        if let Some(network) = &self.network {
            args.extend(network.args());
        }
        if let Some(socket) = &self.tpm_socket {
            args.extend(tpm_args(socket));
        }
        args.extend(self.extra_args.iter().map(OsString::from));
        args
    }

    /// The guest's name, accelerator, vCPUs and memory: a q35 machine
    /// whose memory a vhost-user backend can map.
    fn machine_args(&self) -> Vec<OsString> {
        let memory = format!("{}M", self.memory_mib);
        let mut args: Vec<OsString> = Vec::new();
        if let Some(name) = &self.name {
            args.extend(["-name".into(), name.into()]);
        }
        args.extend([
            "-accel".into(),
            (&self.accel).into(),
            "-smp".into(),
            self.cpus.to_string().into(),
            "-m".into(),
            (&memory).into(),
            // vhost-user needs guest memory the backend can map.
            "-object".into(),
            format!("memory-backend-memfd,id={MEMORY_ID},size={memory},share=on").into(),
            "-machine".into(),
            format!("q35,memory-backend={MEMORY_ID}").into(),
        ]);
        args
    }

    /// The boot disk, with its queues.
    fn disk_args(&self) -> [OsString; 4] {
        let queues = self.queues;
        match &self.disk {
            QemuDisk::VhostUser { socket, reconnect } => {
                let mut chardev = option_value(&format!("socket,id={DISK_ID},path="), socket);
                if let Some(option) = reconnect.chardev_option() {
                    chardev.push(option);
                }
                [
                    "-chardev".into(),
                    chardev,
                    "-device".into(),
                    format!(
                        "vhost-user-blk-pci,chardev={DISK_ID},num-queues={queues},\
                         disable-legacy=on,bootindex=1"
                    )
                    .into(),
                ]
            }
            QemuDisk::Image { path, format } => {
                let mut drive = option_value("file=", path);
                drive.push(format!(
                    ",format={format},if=none,id={DISK_ID},cache=unsafe"
                ));
                [
                    "-drive".into(),
                    drive,
                    "-device".into(),
                    format!(
                        "virtio-blk-pci,drive={DISK_ID},num-queues={queues},\
                         disable-legacy=on,bootindex=1"
                    )
                    .into(),
                ]
            }
        }
    }

    /// The firmware and its variable store, or a kernel loaded directly.
    fn boot_args(&self) -> Vec<OsString> {
        match &self.boot {
            QemuBoot::Uefi { code, vars } => vec![
                "-drive".into(),
                option_value("if=pflash,format=raw,readonly=on,file=", code),
                "-drive".into(),
                option_value("if=pflash,format=raw,file=", vars),
            ],
            QemuBoot::Kernel {
                kernel,
                initrd,
                append,
            } => vec![
                "-kernel".into(),
                kernel.into(),
                "-initrd".into(),
                initrd.into(),
                "-append".into(),
                format!("console=ttyS0 panic=-1 {append}").into(),
            ],
        }
    }

    /// The command, ready for its stdio to be set.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args());
        cmd
    }
}

/// QEMU id of the QMP monitor's chardev.
const QMP_CHARDEV_ID: &str = "qmp";

/// The arguments that give QEMU a QMP monitor listening on the Unix
/// socket `path` (QEMU does not wait for a client).
pub fn qmp_args(path: &Path) -> Vec<OsString> {
    let mut chardev = option_value(&format!("socket,id={QMP_CHARDEV_ID},path="), path);
    chardev.push(",server=on,wait=off");
    vec![
        "-chardev".into(),
        chardev,
        "-mon".into(),
        format!("chardev={QMP_CHARDEV_ID},mode=control").into(),
    ]
}

/// `path` as one word of a POSIX shell command: in single quotes, each
/// single quote written as `'\''`. QEMU's `exec:` migrations run their
/// command with `/bin/sh -c`, and QMP carries it as a JSON string, so the
/// path must be UTF-8 without control characters; others are refused.
pub fn shell_word(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
    if text.chars().any(char::is_control) {
        return Err(format!("{text:?} holds a control character"));
    }
    Ok(format!("'{}'", text.replace('\'', r"'\''")))
}

/// The migration URI that writes a VM's state into the file `path` (QMP
/// `migrate`), which should exist already: the shell's `>` keeps its mode.
pub fn migrate_to_file_uri(path: &Path) -> Result<String, String> {
    Ok(format!("exec:cat > {}", shell_word(path)?))
}

/// The arguments that make QEMU load its state from the file `path`
/// (written by [`migrate_to_file_uri`]) instead of booting.
pub fn incoming_args(path: &Path) -> Result<Vec<OsString>, String> {
    Ok(vec![
        "-incoming".into(),
        format!("exec:cat {}", shell_word(path)?).into(),
    ])
}

/// `prefix` followed by `path` as a QEMU option value, in which a comma
/// would end the value unless doubled.
fn option_value(prefix: &str, path: &Path) -> OsString {
    let mut value = OsString::from(prefix);
    let escaped: Vec<u8> = path
        .as_os_str()
        .as_bytes()
        .iter()
        .flat_map(|&b| if b == b',' { vec![b',', b','] } else { vec![b] })
        .collect();
    value.push(OsStr::from_bytes(&escaped));
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(cmd: &QemuCommand) -> String {
        cmd.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn reconnect_is_spelt_as_the_qemu_in_use_takes_it() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)\n"),
            Some((7, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2\n"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("something else"), None);
        assert_eq!(Reconnect::for_qemu(Some((7, 2))), Reconnect::Seconds);
        assert_eq!(Reconnect::for_qemu(Some((9, 1))), Reconnect::Seconds);
        assert_eq!(Reconnect::for_qemu(Some((9, 2))), Reconnect::Millis);
        assert_eq!(Reconnect::for_qemu(Some((10, 0))), Reconnect::Millis);
        assert_eq!(Reconnect::for_qemu(None), Reconnect::Seconds);
        let mut cmd = QemuCommand::new(
            QemuDisk::VhostUser {
                socket: "/s".into(),
                reconnect: Reconnect::Millis,
            },
            QemuBoot::Uefi {
                code: "/c".into(),
                vars: "/v".into(),
            },
        );
        assert!(text(&cmd).contains("-chardev socket,id=disk0,path=/s,reconnect-ms=1000 "));
        cmd.disk = QemuDisk::VhostUser {
            socket: "/s".into(),
            reconnect: Reconnect::Off,
        };
        assert!(text(&cmd).contains("-chardev socket,id=disk0,path=/s "));
    }

    #[test]
    fn state_files_are_single_shell_words() {
        assert_eq!(
            migrate_to_file_uri(Path::new("/s/it's $HOME/vmstate")).unwrap(),
            r"exec:cat > '/s/it'\''s $HOME/vmstate'"
        );
        let incoming = incoming_args(Path::new("/s/a b/vmstate")).unwrap();
        assert_eq!(incoming, ["-incoming", "exec:cat '/s/a b/vmstate'"]);
        shell_word(Path::new("/s/new\nline")).unwrap_err();
        shell_word(Path::new(OsStr::from_bytes(b"/s/\xff"))).unwrap_err();
        let qmp: Vec<OsString> = qmp_args(Path::new("/s,t/qmp.sock"));
        assert_eq!(
            qmp,
            [
                "-chardev",
                "socket,id=qmp,path=/s,,t/qmp.sock,server=on,wait=off",
                "-mon",
                "chardev=qmp,mode=control"
            ]
        );
    }

    #[test]
    fn commas_in_paths_are_doubled_for_qemu() {
        assert_eq!(
            option_value("file=", Path::new("/a,b/c")),
            OsString::from("file=/a,,b/c")
        );
    }

    #[test]
    fn a_vhost_user_node_under_ovmf() {
        let mut cmd = QemuCommand::new(
            QemuDisk::VhostUser {
                socket: "/s/node.sock".into(),
                reconnect: Reconnect::Seconds,
            },
            QemuBoot::Uefi {
                code: "/fw/code.fd".into(),
                vars: "/s/vars.fd".into(),
            },
        );
        cmd.name = Some("n-1".into());
        cmd.cpus = 2;
        cmd.extra_args = vec!["-no-reboot".into()];
        assert_eq!(
            text(&cmd),
            "-name n-1 -accel tcg -smp 2 -m 512M \
             -object memory-backend-memfd,id=mem,size=512M,share=on \
             -machine q35,memory-backend=mem \
             -chardev socket,id=disk0,path=/s/node.sock,reconnect=1 \
             -device vhost-user-blk-pci,chardev=disk0,num-queues=2,disable-legacy=on,bootindex=1 \
             -display none -serial stdio -monitor none -nodefaults \
             -drive if=pflash,format=raw,readonly=on,file=/fw/code.fd \
             -drive if=pflash,format=raw,file=/s/vars.fd -no-reboot"
        );
    }

    #[test]
    fn a_cluster_nic_an_uplink_and_a_tpm() {
        let mut cmd = QemuCommand::new(
            QemuDisk::VhostUser {
                socket: "/s/node.sock".into(),
                reconnect: Reconnect::Off,
            },
            QemuBoot::Uefi {
                code: "/fw/code.fd".into(),
                vars: "/s/vars.fd".into(),
            },
        );
        cmd.network = Some(QemuNetwork {
            group: "239.255.1.2:5000".into(),
            mac: "52:54:00:00:00:01".into(),
            uplink_mac: Some("52:54:00:00:00:02".into()),
        });
        cmd.tpm_socket = Some("/s/swtpm.sock".into());
        cmd.extra_args = vec!["-no-reboot".into()];
        assert!(
            text(&cmd).ends_with(
                "-drive if=pflash,format=raw,file=/s/vars.fd \
                 -netdev socket,id=cluster,mcast=239.255.1.2:5000,localaddr=127.0.0.1 \
                 -device virtio-net-pci,netdev=cluster,mac=52:54:00:00:00:01,romfile= \
                 -netdev user,id=uplink \
                 -device virtio-net-pci,netdev=uplink,mac=52:54:00:00:00:02,romfile= \
                 -chardev socket,id=chrtpm,path=/s/swtpm.sock \
                 -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0 -no-reboot"
            ),
            "{}",
            text(&cmd)
        );
    }

    #[test]
    fn an_image_file_with_a_direct_kernel() {
        let cmd = QemuCommand::new(
            QemuDisk::Image {
                path: "/d/n,1.qcow2".into(),
                format: "qcow2".into(),
            },
            QemuBoot::Kernel {
                kernel: "/k/vmlinuz".into(),
                initrd: "/k/initrd".into(),
                append: "quiet".into(),
            },
        );
        let text = text(&cmd);
        assert!(
            text.contains(
                "-drive file=/d/n,,1.qcow2,format=qcow2,if=none,id=disk0,cache=unsafe \
                 -device virtio-blk-pci,drive=disk0,num-queues=2,disable-legacy=on,bootindex=1"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "-kernel /k/vmlinuz -initrd /k/initrd -append console=ttyS0 panic=-1 quiet"
            ),
            "{text}"
        );
        assert!(!text.contains("pflash"), "{text}");
    }
}
