#!/bin/sh
# Entry point of the sample system partition, run by the initramfs once the
# partition is mounted at /system. Bootstraps the node's data partition on
# first boot, prints the ready line a test harness waits for, then offers a
# shell on the console.

. /system/etc/os-release
echo "ociblk-sample: product: $PRETTY_NAME ($(uname -r))"

# First-boot bootstrap, the work a real node does once and keeps on its data
# partition: an ext2 file system (the first 16 MiB of METROPOLIS-NODE-DATA,
# so it stays quick under TCG) holding /node-state with the node's name (the
# disk serial) and a random id. A later boot (or a fork of a saved node)
# finds the state and says so. Data the partition already holds that is not
# such a file system is left alone: never format over someone's data.
bootstrap() {
	data=
	for ue in /sys/class/block/*/uevent; do
		if grep -qx 'PARTNAME=METROPOLIS-NODE-DATA' "$ue" 2>/dev/null; then
			data=$(sed -n 's/^DEVNAME=//p' "$ue")
			break
		fi
	done
	if [ -z "$data" ]; then
		echo "ociblk-sample: no METROPOLIS-NODE-DATA partition; no bootstrap"
		return 0
	fi
	disk=$(basename "$(readlink -f "/sys/class/block/$data/..")")
	mkdir -p /data
	if mount -t ext4 "/dev/$data" /data 2>/dev/null; then
		if [ -f /data/node-state ]; then
			id=$(sed -n 's/^id=//p' /data/node-state)
			umount /data
			echo "ociblk-sample: found state $id"
			return 0
		fi
	elif cmp -s -n 1048576 "/dev/$data" /dev/zero; then
		mke2fs -q -L node-data "/dev/$data" 16384 >/dev/null 2>&1 ||
			{ echo "ociblk-sample: bootstrap: mke2fs /dev/$data failed"; return 1; }
		mount -t ext4 "/dev/$data" /data ||
			{ echo "ociblk-sample: bootstrap: cannot mount /dev/$data"; return 1; }
	else
		echo "ociblk-sample: /dev/$data holds other data; no bootstrap"
		return 0
	fi
	id=$(cat /proc/sys/kernel/random/uuid)
	name=$(cat "/sys/block/$disk/serial" 2>/dev/null)
	printf 'name=%s\nid=%s\n' "$name" "$id" >/data/node-state.tmp &&
		mv /data/node-state.tmp /data/node-state && sync
	umount /data
	echo "ociblk-sample: bootstrapped $id"
}
bootstrap

# Network (ociblk launch --network/--uplink): the NIC whose MAC starts
# 52:54:00 is on the cluster segment and takes 10.77.<5th>.<6th MAC
# byte>/16, so every node knows every other node's address from its name;
# the one starting 52:55:00 is QEMU's user-mode uplink.
network() {
	for dev in /sys/class/net/*; do
		name=${dev##*/}
		mac=$(cat "$dev/address" 2>/dev/null)
		case $mac in
		52:54:00:*)
			b5=$(printf %d "0x$(echo "$mac" | cut -d: -f5)")
			b6=$(printf %d "0x$(echo "$mac" | cut -d: -f6)")
			ip link set "$name" up &&
				ip addr add "10.77.$b5.$b6/16" dev "$name" &&
				echo "ociblk-sample: network $name 10.77.$b5.$b6/16"
			;;
		52:55:00:*)
			ip link set "$name" up &&
				ip addr add 10.0.2.15/24 dev "$name" &&
				ip route add default via 10.0.2.2 dev "$name" &&
				echo "ociblk-sample: uplink $name 10.0.2.15/24"
			;;
		esac
	done
	ip link set lo up
}
network

echo "ociblk-sample: ready"

# ociblk.halt=1: boot benchmarks and demos only need the ready line.
for arg in $(cat /proc/cmdline); do
	if [ "$arg" = "ociblk.halt=1" ]; then
		sync
		poweroff -f
	fi
done

# setsid + cttyhack give the shell the console as controlling terminal, so
# job control and Ctrl-C work over the serial line.
setsid cttyhack sh
sync
poweroff -f
