#!/bin/bash
# Runs inside the test bed guest (host flavour): what lvcreate -s and lvremove of a classic snapshot cost,
# as LVM does them by default and without dmeventd monitoring, page cache warm. Five rounds each.
#   tests/vm/run-guest script --flavour host bench/lvcreate-in-guest.sh
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
disk=/dev/disk/by-id/virtio-xbtest1
wipefs -aq "$disk"; pvcreate -q "$disk"; vgcreate -q system "$disk"
lvcreate -q -y -L 512M -n xenvm system; mkfs.ext4 -q /dev/system/xenvm
TIMEFORMAT=%R
t() { local s; s=$( { time "$@" >/dev/null 2>&1; } 2>&1 ); echo "$s"; }
{
echo "dmeventd running before: $(pgrep -c dmeventd)"
lvmconfig --type full activation/monitoring activation/snapshot_autoextend_threshold activation/udev_sync 2>&1
for mode in default nomonitor default nomonitor; do
    for r in 1 2 3; do
        if [ "$mode" = default ]; then
            c=$(t lvcreate -q -y -s -L 128M -n snap system/xenvm)
        else
            c=$(t lvcreate -q -y -s -L 128M -n snap --monitor n system/xenvm)
        fi
        m=$(t mount -o ro,noload /dev/system/snap /mnt); u=$(t umount /mnt)
        d=$(t lvremove -q -y system/snap)
        echo "$mode lvcreate $c mount $m umount $u lvremove $d"
    done
done
echo "dmeventd running after: $(pgrep -c dmeventd)"
lvcreate -vvv -y -s -L 128M -n snap system/xenvm 2>&1 | awk '{ print strftime("%T") " " $0 }' | tail -5
lvremove -q -y system/snap
# Where lvcreate's time goes: its own verbose log carries no timestamps, so strace's relative times.
if command -v strace >/dev/null; then
    strace -f -r -e trace=execve,connect,openat,ioctl,semop,semtimedop -o /tmp/lvc.trace lvcreate -q -y -s -L 128M -n snap system/xenvm
    awk '$2 > 0.02' /tmp/lvc.trace | head -40
    lvremove -q -y system/snap
fi
} > "$results/lvcreate.txt" 2>&1
cat "$results/lvcreate.txt"
