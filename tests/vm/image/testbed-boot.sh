#!/bin/bash
# Baked into the image and started by testbed-run.service. Kept minimal on
# purpose: all test logic lives in the repository's tests/vm/guest-run.sh,
# which is read from the 9p share, so changing it needs no image rebuild.
# The host watches the console for the XBTEST-* lines.
set -u

limit=1800
for arg in $(</proc/cmdline); do
    case $arg in
    xenbackup.timeout=*) limit=${arg#*=} ;;
    esac
done

echo "XBTEST-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)s"

fail() {
    echo "XBTEST-ERROR $*"
    exit 1
}

modprobe 9pnet_virtio && modprobe 9p || fail "cannot load the 9p kernel modules"
opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,ro" src /mnt/src || fail "cannot mount the 9p share 'src' at /mnt/src"
mount -t 9p -o "$opts,rw" results /mnt/results || fail "cannot mount the 9p share 'results' at /mnt/results"

runner=/mnt/src/tests/vm/guest-run.sh
[ -f "$runner" ] || fail "$runner is missing from the shared project tree"
timeout --kill-after=30 "$limit" bash "$runner"
rc=$?
[ "$rc" -eq 124 ] && [ ! -e /mnt/results/exit-code ] &&
    echo "XBTEST-ERROR guest-run.sh exceeded the guest's limit of ${limit}s"
echo "XBTEST-RUNNER-EXIT rc=$rc"
sync
exit "$rc"
