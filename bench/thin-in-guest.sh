#!/bin/bash
# Runs inside the test bed guest (host flavour): changed-block incrementals against the bare recipe for a
# block device (`restic backup --stdin` of a thin snapshot), in one boot, on a 2 GiB thin LV of random data.
# Three rounds: the first run, then 1 % of the device rewritten, then 10 %. Each round times both methods
# (page caches dropped before each) and counts the bytes read from the snapshot device: the kernel's own
# counter (/sys/block/dm-N/stat) for both, and xenbackup's XENBACKUP_BYTES_READ beside it.
#   tests/vm/run-guest script --flavour host bench/thin-in-guest.sh [SIZE_MIB]
set -euo pipefail
export LC_ALL=C
results=${XBTEST_RESULTS:-/mnt/results}
out="$results/thin-bench.txt"
size_mib=${1:-2048}
MiB=1048576

log() { echo "thin-bench: $*" >&2; }
now() { date +%s.%N; }

# The thin pool on one blank disk, each repository on a disk of its own (random data does not compress).
pool_disk=/dev/disk/by-id/virtio-xbtest1
for d in "$pool_disk" /dev/disk/by-id/virtio-xbtest2 /dev/disk/by-id/virtio-xbtest3; do wipefs -aq "$d"; done
pvcreate -q "$pool_disk"
vgcreate -q bench "$pool_disk"
lvcreate -q -y --type thin-pool -L 3800M -n pool bench
lvcreate -q -y --type thin -V "${size_mib}M" --thinpool pool -n blk bench
dev=/dev/bench/blk
for n in 2 3; do
    mkfs.ext4 -q /dev/disk/by-id/virtio-xbtest$n
    mkdir -p /srv/repo$n
    mount /dev/disk/by-id/virtio-xbtest$n /srv/repo$n
done
log "writing ${size_mib} MiB of random data"
dd if=/dev/urandom of="$dev" bs=1M count="$size_mib" oflag=direct status=none

pw=/root/bench-pw
echo bench-password > "$pw"
export RESTIC_PASSWORD_FILE=$pw
bare_repo=/srv/repo3/bare
restic -q -r "$bare_repo" init >/dev/null
mkdir -p /etc/xenbackup
cat > /etc/xenbackup/xenbackup.toml <<TOML
[repository]
url = "/srv/repo2/xb"
password_file = "$pw"
[settings]
thin_incremental = true
[vm.vm1]
hypervisor = "none"
disks = [{ lv = "bench/blk", mode = "block" }]
TOML
xenbackup init >/dev/null

# The kernel's count of bytes read from a device-mapper device, by its minor number.
read_bytes() { echo $(( $(awk '{print $3}' "/sys/block/dm-$1/stat") * 512 )); }
minor_of() { lvs --noheadings -o lv_kernel_minor "$1" | tr -d ' '; }

bare() {  # the recipe for a block device: thin snapshot, restic --stdin, lvremove
    lvcreate -q -y -s -n baresnap bench/blk
    lvchange -q -ay -K bench/baresnap
    restic -q -r "$bare_repo" backup --stdin --stdin-filename blk.img < /dev/bench/baresnap >/dev/null
    bare_read=$(read_bytes "$(minor_of bench/baresnap)")
    lvremove -q -y bench/baresnap
}

xb() {
    local since
    since=$(date '+%Y-%m-%d %H:%M:%S')
    systemctl start xenbackup@vm1.service
    # The run's snapshot is the base now: the kernel counted what restic and udev read from it.
    xb_read=$(read_bytes "$(lvs --noheadings -o lv_kernel_minor @xenbackup-base:vm1 | tr -d ' ')")
    xb_field=$(journalctl -u xenbackup@vm1.service --since "$since" -o json | python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    if "XENBACKUP_BYTES_READ" in e:
        print(e["XENBACKUP_BYTES_READ"], e.get("XENBACKUP_SEGMENTS_UNMODIFIED", "?"))')
}

# Rewrite PERCENT of the device as clusters of 4 MiB spread evenly across it (a guest's writes land in a
# few places, not in every 64 MiB segment).
change() {
    local percent=$1 total clusters stride i
    total=$(( size_mib * percent / 100 ))
    clusters=$(( total / 4 ))
    stride=$(( size_mib / clusters ))
    for ((i = 0; i < clusters; i++)); do
        dd if=/dev/urandom of="$dev" bs=1M count=4 seek=$(( i * stride + 1 )) oflag=direct conv=notrunc status=none
    done
    log "rewrote ${total} MiB in ${clusters} clusters of 4 MiB"
}

timed() {  # timed NAME: runs NAME with cold page caches, sets $secs
    sync; echo 3 > /proc/sys/vm/drop_caches
    local t0
    t0=$(now)
    "$1"
    secs=$(python3 -c "print(f'{$(now) - $t0:.1f}')")
}

rows=()
for round in first 1 10; do
    [ "$round" = first ] || change "$round"
    timed bare; bare_s=$secs
    timed xb; xb_s=$secs
    label=$([ "$round" = first ] && echo "first run" || echo "${round} % changed")
    rows+=("| $label | $bare_s | $(( bare_read / MiB )) | $xb_s | $(( xb_read / MiB )) | ${xb_field% *} / ${xb_field#* } | $(python3 -c "print(f'{$xb_s / $bare_s:.2f}')") |")
    log "${rows[-1]}"
done

{
    echo "${size_mib} MiB thin LV (random data), restic $(restic version | cut -d' ' -f2), $(nproc) vCPU, TCG"
    echo
    echo "| run | bare: s | bare: MiB read | xenbackup: s | xenbackup: MiB read | XENBACKUP_BYTES_READ / segments unread | xenbackup / bare |"
    echo "| --- | ---: | ---: | ---: | ---: | --- | ---: |"
    printf '%s\n' "${rows[@]}"
} | tee "$out"
# What a restore of a segmented run writes is proven by tests/vm/guest/product/test_thin_incremental.py (sha256
# of the whole device); a 2 GiB restore target does not fit beside the pool on the test bed's disks.
