#!/bin/sh
# Entry point of the sample system partition, run by the initramfs once the
# partition is mounted at /system. Prints the ready line a test harness waits
# for, then offers a shell on the console.

. /system/etc/os-release
echo "ociblk-sample: product: $PRETTY_NAME ($(uname -r))"
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
