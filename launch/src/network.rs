//! The virtual L2 network the nodes of one cluster share: every QEMU joins
//! a UDP multicast group on the loopback interface (QEMU's `socket` netdev
//! with `mcast=`), so Ethernet frames one node sends reach every other node
//! and nothing leaves the machine. Each node's MAC is derived from its
//! name; the sample guest derives its IPv4 address from the MAC.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// QEMU's locally administered OUI; the sample guest configures the NIC
/// whose MAC starts with it as the cluster interface.
pub const CLUSTER_MAC_PREFIX: [u8; 3] = [0x52, 0x54, 0x00];
/// The uplink NIC's prefix, so the guest can tell the two apart.
pub const UPLINK_MAC_PREFIX: [u8; 3] = [0x52, 0x55, 0x00];
/// The guest's cluster address is `10.77.<mac[4]>.<mac[5]>/16`.
pub const CLUSTER_SUBNET: [u8; 2] = [10, 77];

/// How the nodes are connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Multicast group and port of the cluster's L2 segment, joined on
    /// 127.0.0.1 only.
    pub group: SocketAddrV4,
    /// Also give every node a second NIC on QEMU's user-mode network
    /// (NAT to the host, 10.0.2.0/24).
    pub uplink: bool,
}

impl NetworkSpec {
    /// A segment of its own: a UDP port the kernel hands out as unused,
    /// in a group in 239.255.0.0/16 (organisation-local scope) picked from
    /// the process and time, so clusters launched side by side do not
    /// share frames.
    pub fn on_loopback(uplink: bool) -> io::Result<NetworkSpec> {
        let port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = Sha256::digest(format!("{}:{now}:{port}", std::process::id()));
        // .0 and .255 of a /24 are avoided out of caution with old stacks.
        let group = Ipv4Addr::new(239, 255, seed[0], seed[1].clamp(1, 254));
        Ok(NetworkSpec {
            group: SocketAddrV4::new(group, port),
            uplink,
        })
    }
}

/// A node's cluster MAC: the QEMU prefix and three bytes of SHA-256 of
/// its name, so a node keeps its MAC across launches and forks.
pub fn node_mac(name: &str) -> [u8; 6] {
    let hash = Sha256::digest(name.as_bytes());
    let [a, b, c] = CLUSTER_MAC_PREFIX;
    [a, b, c, hash[0], hash[1], hash[2]]
}

/// The node's uplink MAC: same low bytes, the uplink prefix.
pub fn uplink_mac(name: &str) -> [u8; 6] {
    let mut mac = node_mac(name);
    mac[..3].copy_from_slice(&UPLINK_MAC_PREFIX);
    mac
}

/// The IPv4 address the sample guest gives itself for `mac` (see
/// hack/guest/system/start.sh).
pub fn guest_address(mac: [u8; 6]) -> Ipv4Addr {
    let [a, b] = CLUSTER_SUBNET;
    Ipv4Addr::new(a, b, mac[4], mac[5])
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Why a set of node names cannot share one network: two of them would
/// get the same guest address, or one an address that is not a host's.
pub fn check_addresses<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    let mut seen: Vec<(Ipv4Addr, &str)> = Vec::new();
    for name in names {
        let address = guest_address(node_mac(name));
        let [.., c, d] = address.octets();
        if (c, d) == (0, 0) || (c, d) == (255, 255) {
            return Err(format!(
                "node {name:?} would get the network or broadcast address {address}; rename it"
            ));
        }
        if let Some((_, other)) = seen.iter().find(|(a, _)| *a == address) {
            return Err(format!(
                "nodes {other:?} and {name:?} would share the address {address}; rename one"
            ));
        }
        seen.push((address, name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_depends_only_on_the_name() {
        assert_eq!(node_mac("node-1"), node_mac("node-1"));
        assert_ne!(node_mac("node-1"), node_mac("node-2"));
        assert_eq!(node_mac("node-1")[..3], CLUSTER_MAC_PREFIX);
        // Locally administered, unicast.
        assert_eq!(node_mac("x")[0] & 0b11, 0b10);
        let hash = Sha256::digest(b"node-1");
        assert_eq!(node_mac("node-1")[3..], hash[..3]);
    }

    #[test]
    fn the_uplink_mac_differs_from_the_cluster_mac_only_in_its_prefix() {
        let (cluster, uplink) = (node_mac("n"), uplink_mac("n"));
        assert_eq!(uplink[..3], UPLINK_MAC_PREFIX);
        assert_eq!(cluster[3..], uplink[3..]);
    }

    #[test]
    fn guest_addresses_come_from_the_macs_last_two_bytes() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        assert_eq!(guest_address(mac), Ipv4Addr::new(10, 77, 0x34, 0x56));
        assert_eq!(format_mac(mac), "52:54:00:12:34:56");
    }

    #[test]
    fn numbered_nodes_get_distinct_addresses() {
        let names: Vec<String> = (1..=64).map(|i| format!("node-{i}")).collect();
        check_addresses(names.iter().map(String::as_str)).unwrap();
    }

    #[test]
    fn colliding_addresses_are_refused_naming_both_nodes() {
        // Find two names with the same last two MAC bytes.
        let mut by_address = std::collections::HashMap::new();
        let (first, second) = (0..100_000)
            .map(|i| format!("n{i}"))
            .find_map(|name| {
                let address = guest_address(node_mac(&name));
                by_address
                    .insert(address, name.clone())
                    .map(|other| (other, name))
            })
            .expect("a collision among 100000 names in 65536 addresses");
        let err = check_addresses([first.as_str(), second.as_str()]).unwrap_err();
        assert!(err.contains(&first) && err.contains(&second), "{err}");
    }

    #[test]
    fn groups_are_organisation_local_multicast() {
        let spec = NetworkSpec::on_loopback(false).unwrap();
        assert!(spec.group.ip().is_multicast());
        assert_eq!(spec.group.ip().octets()[..2], [239, 255]);
        assert_ne!(spec.group.port(), 0);
    }
}
