#!/bin/bash
# Runs inside the test bed guest (host flavour): times xenbackup against the bare shell recipe with the
# same engine (restic), against the same recipe with borg, and against the tar floor, on the same data,
# in the same boot. Each method runs twice; the second run sees unchanged data.
set -euo pipefail
export LC_ALL=C
results=${XBTEST_RESULTS:-/mnt/results}
out="$results/bench.txt"
disk=/dev/disk/by-id/virtio-xbtest1
image_mb=${1:-${BENCH_IMAGE_MB:-300}}
small_files=${2:-${BENCH_SMALL_FILES:-2000}}

log() { echo "bench: $*" >&2; }
now() { date +%s.%N; }

# --- the data set: the seed layout with a mixed-content image and many small files
wipefs -aq "$disk"
pvcreate -q "$disk"
vgcreate -q system "$disk"
lvcreate -q -y -L 1536M -n xenvm system
mkfs.ext4 -q /dev/system/xenvm
mkdir -p /srv/xenvm /mnt/vmbackup
mount /dev/system/xenvm /srv/xenvm
mkdir -p /srv/xenvm/vm1/small
log "writing ${image_mb} MB image and ${small_files} small files"
python3 - "$image_mb" "$small_files" <<'PY'
import os, random, sys
mb, n = int(sys.argv[1]), int(sys.argv[2])
rnd = random.Random(1)
with open("/srv/xenvm/vm1/disk.img", "wb") as f:
    for i in range(mb):
        kind = i % 4
        if kind == 0:
            f.write(os.urandom(1 << 20))                    # incompressible
        elif kind == 1:
            f.write(bytes(1 << 20))                         # zeros
        else:
            words = [rnd.choice(["xen", "lvm", "restic", "backup", "snapshot", "journal"]) for _ in range(200)]
            f.write((" ".join(words) * 200).encode()[: 1 << 20].ljust(1 << 20, b"."))
for i in range(n):
    with open(f"/srv/xenvm/vm1/small/f{i:05d}.txt", "w") as f:
        f.write(f"file {i}\n" * rnd.randint(1, 200))
PY
sync
echo 'name = "vm1"' > /etc/xen-vm1.cfg

pw=/root/bench-pw
echo bench-password > "$pw"
export RESTIC_PASSWORD_FILE=$pw BORG_PASSPHRASE=bench-password BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

bare_restic() {  # the seed's recipe, scripted by hand
    lvcreate -q -y -s -L 1G -n vmbackup system/xenvm
    mount -o ro,noload /dev/system/vmbackup /mnt/vmbackup
    restic -q -r /var/tmp/bare-repo backup /mnt/vmbackup/vm1 >/dev/null
    umount /mnt/vmbackup
    lvremove -q -y system/vmbackup
}

bare_borg() {
    lvcreate -q -y -s -L 1G -n vmbackup system/xenvm
    mount -o ro,noload /dev/system/vmbackup /mnt/vmbackup
    borg create --compression lz4 /var/tmp/borg-repo::run-$(date +%s%N) /mnt/vmbackup/vm1
    umount /mnt/vmbackup
    lvremove -q -y system/vmbackup
}

tar_floor() {
    lvcreate -q -y -s -L 1G -n vmbackup system/xenvm
    mount -o ro,noload /dev/system/vmbackup /mnt/vmbackup
    tar -C /mnt/vmbackup -cf - vm1 >/dev/null
    umount /mnt/vmbackup
    lvremove -q -y system/vmbackup
}

xenbackup_unit() { systemctl start xenbackup@vm1.service; }
xenbackup_fg() { xenbackup backup vm1 2>/dev/null; }

mkdir -p /etc/xenbackup
cat > /etc/xenbackup/xenbackup.toml <<TOML
[repository]
url = "/var/tmp/xb-repo"
password_file = "$pw"
[vm.vm1]
domain_config = "/etc/xen-vm1.cfg"
snapshot_size = "1G"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
TOML

# Every repository is created before the clock starts, so each method times only its backups.
restic -q -r /var/tmp/bare-repo init >/dev/null
xenbackup init >/dev/null
borg init --encryption repokey-blake2 /var/tmp/borg-repo

declare -A t1 t2
methods=(bare_restic xenbackup_unit xenbackup_fg bare_borg tar_floor)
for m in "${methods[@]}"; do
    for run in 1 2; do
        sync; echo 3 > /proc/sys/vm/drop_caches
        s=$(now); "$m"; e=$(now)
        secs=$(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.1f", e - s }')
        log "$m run $run: $secs s"
        if [ $run = 1 ]; then t1[$m]=$secs; else t2[$m]=$secs; fi
    done
    # xenbackup_fg reuses the unit's repository: its first run is a second run. Give it its own.
    if [ "$m" = xenbackup_unit ]; then rm -rf /var/tmp/xb-repo /var/lib/xenbackup/state; xenbackup init >/dev/null; fi
done

{
    echo "data: ${image_mb} MB mixed image + ${small_files} small files on a 1.5 GiB ext4 LV"
    echo "restic $(restic version | awk '{print $2}'), borg $(borg --version | awk '{print $2}'), $(nproc) vCPU"
    printf '%-16s %10s %10s %12s %12s\n' method "1st (s)" "2nd (s)" "1st/bare" "2nd/bare"
    for m in "${methods[@]}"; do
        printf '%-16s %10s %10s %12s %12s\n' "$m" "${t1[$m]}" "${t2[$m]}" \
            "$(awk -v a="${t1[$m]}" -v b="${t1[bare_restic]}" 'BEGIN { printf "%.2f", a / b }')" \
            "$(awk -v a="${t2[$m]}" -v b="${t2[bare_restic]}" 'BEGIN { printf "%.2f", a / b }')"
    done
} | tee "$out"
cp "$out" "$results/summary.txt"
