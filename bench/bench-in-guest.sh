#!/bin/bash
# Runs inside the test bed guest (host flavour): times xenbackup against the bare shell recipe with the
# same engine (restic), against the same recipe with borg, against borgmatic's LVM hook (the peer product,
# when bench/run could fetch its wheels) and against the tar floor, on the same data, in the same boot.
# Each method runs twice; the second run sees unchanged data. Then the fixed costs: imports per step, and
# `xenbackup status` and the generator for 100 VMs (bench/overhead.py).
set -euo pipefail
export LC_ALL=C
results=${XBTEST_RESULTS:-/mnt/results}
out="$results/bench.txt"
. "$(dirname "$0")/guest-volume.sh"
image_mb=${1:-${BENCH_IMAGE_MB:-300}}
small_files=${2:-${BENCH_SMALL_FILES:-2000}}

log() { echo "bench: $*" >&2; }
now() { date +%s.%N; }

# --- the data set: the seed layout with a mixed-content image and many small files
bench_volume 1536M
mkdir -p /mnt/vmbackup
log "writing ${image_mb} MB image and ${small_files} small files"
bench_dataset "$image_mb" "$small_files"
echo 'name = "vm1"' > /etc/xen-vm1.cfg

pw=/root/bench-pw
bench_config "$pw" 1G 'domain_config = "/etc/xen-vm1.cfg"'
# The guest's script runs without $HOME: restic by hand would then run without its local cache, which the
# unit has (CacheDirectory=); borg finds root's home itself.
export XDG_CACHE_HOME=/root/.cache
export RESTIC_PASSWORD_FILE=$pw BORG_PASSPHRASE=bench-password BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes

bare_restic() {  # the seed's recipe, scripted by hand; its snapshot's life and restic's are noted for the table
    local t0 t1 t2
    t0=$(now)
    lvcreate -q -y -s -L 1G -n vmbackup system/xenvm
    mount -o ro,noload /dev/system/vmbackup /mnt/vmbackup
    t1=$(now)
    # --json as xenbackup runs it, for restic's own total_duration
    restic -r /var/tmp/bare-repo backup --json /mnt/vmbackup/vm1 | tail -1 >/tmp/bare-summary.json
    t2=$(now)
    umount /mnt/vmbackup
    lvremove -q -y system/vmbackup
    python3 -c 'import json, sys
a, b, c, d = map(float, sys.argv[2:])
print("%.1f %.1f %.1f" % (d - a, json.load(open(sys.argv[1]))["total_duration"], c - b))' \
        /tmp/bare-summary.json "$t0" "$t1" "$t2" "$(now)" >/tmp/bare-lifetime
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

# borgmatic 2.x with its LVM hook: it finds the LV under the source directory, snapshots it, mounts the
# snapshot under a fresh path and runs borg there. The guest is offline: bench/run downloads the wheels on
# the build machine, and they are installed from the source share.
wheels=/mnt/src/tests/vm/artifacts/bench-wheels
borgmatic_note=""
if compgen -G "$wheels/borgmatic-*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --find-links "$wheels" --target /opt/borgmatic --break-system-packages \
        borgmatic >/tmp/borgmatic-install.log 2>&1 || borgmatic_note="pip install failed: $(tail -1 /tmp/borgmatic-install.log)"
else
    borgmatic_note="no borgmatic wheels in the source share (bench/run downloads them)"
fi
cat > /etc/borgmatic-bench.yaml <<YAML
source_directories:
    - /srv/xenvm/vm1
repositories:
    - path: /var/tmp/borgmatic-repo
      label: bench
encryption_passphrase: bench-password
compression: lz4
lvm:
    snapshot_size: 1G
YAML
borgmatic_lvm() {
    PYTHONPATH=/opt/borgmatic /opt/borgmatic/bin/borgmatic --config /etc/borgmatic-bench.yaml create \
        >>/tmp/borgmatic-run.log 2>&1
}

# How long the snapshot lived and how long restic took within it, from the run's record (the unit's
# journal carries the same numbers as XENBACKUP_SNAPSHOT_SECONDS and XENBACKUP_RESTIC_SECONDS).
lifetime() {
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))
print("%.1f %.1f" % (r.get("snapshot_seconds") or 0, r.get("restic_seconds") or 0))' /var/lib/xenbackup/state/vm1.json
}


# Every repository is created before the clock starts, so each method times only its backups.
restic -q -r /var/tmp/bare-repo init >/dev/null
xenbackup init >/dev/null
borg init --encryption repokey-blake2 /var/tmp/borg-repo
borg init --encryption repokey-blake2 /var/tmp/borgmatic-repo

declare -A t1 t2 life1 life2
# borgmatic last: a peer that fails may leave its snapshot, which must not take the others' room.
methods=(bare_restic xenbackup_unit xenbackup_fg bare_borg tar_floor borgmatic_lvm)
for m in "${methods[@]}"; do
    for run in 1 2; do
        if [ "$m" = borgmatic_lvm ] && [ -n "$borgmatic_note" ]; then
            t1[$m]=-; t2[$m]=-; break
        fi
        sync; echo 3 > /proc/sys/vm/drop_caches
        s=$(now)
        if [ "$m" = borgmatic_lvm ]; then
            # A failure of the peer is a finding to report, not a reason to lose the other numbers.
            "$m" || borgmatic_note="borgmatic create failed: $(grep -v '^$' /tmp/borgmatic-run.log | tail -2 | tr '\n' ' ')"
        else
            "$m"
        fi
        e=$(now)
        secs=$(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.1f", e - s }')
        [ -n "$borgmatic_note" ] && [ "$m" = borgmatic_lvm ] && secs=-
        log "$m run $run: $secs s"
        if [ $run = 1 ]; then t1[$m]=$secs; else t2[$m]=$secs; fi
        case $m in
        xenbackup_*) life=$(lifetime) ;;
        bare_restic) life=$(cat /tmp/bare-lifetime) ;;
        *) life="" ;;
        esac
        if [ $run = 1 ]; then life1[$m]=$life; else life2[$m]=$life; fi
    done
    if [ "$m" = xenbackup_unit ]; then
        journalctl -u xenbackup@vm1.service -o json MESSAGE_ID=14a99ce9301e4006b02b2ce251777ef6 |
            python3 -c 'import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("journal: XENBACKUP_SNAPSHOT_SECONDS=%s XENBACKUP_RESTIC_SECONDS=%s" % (
        e.get("XENBACKUP_SNAPSHOT_SECONDS"), e.get("XENBACKUP_RESTIC_SECONDS")))' > /tmp/unit-journal.txt
        journalctl -u xenbackup@vm1.service -o short-precise > "$results/unit-journal.txt"
    fi
    # xenbackup_fg reuses the unit's repository: its first run is a second run. Give it its own.
    if [ "$m" = xenbackup_unit ]; then rm -rf /var/tmp/xb-repo /var/lib/xenbackup/state; xenbackup init >/dev/null; fi
done

{
    echo "data: ${image_mb} MB mixed image + ${small_files} small files on a 1.5 GiB ext4 LV"
    echo "restic $(restic version | awk '{print $2}'), borg $(borg --version | awk '{print $2}'), $(nproc) vCPU"
    printf '%-16s %10s %10s %12s %12s\n' method "1st (s)" "2nd (s)" "1st/bare" "2nd/bare"
    for m in "${methods[@]}"; do
        printf '%-16s %10s %10s %12s %12s\n' "$m" "${t1[$m]}" "${t2[$m]}" \
            "$(awk -v a="${t1[$m]}" -v b="${t1[bare_restic]}" 'BEGIN { if (a == "-") print "-"; else printf "%.2f", a / b }')" \
            "$(awk -v a="${t2[$m]}" -v b="${t2[bare_restic]}" 'BEGIN { if (a == "-") print "-"; else printf "%.2f", a / b }')"
    done
    if [ "${t1[borgmatic_lvm]}" != - ]; then
        printf 'borgmatic_lvm / xenbackup_unit: %s (1st), %s (2nd)\n' \
            "$(awk -v a="${t1[borgmatic_lvm]}" -v b="${t1[xenbackup_unit]}" 'BEGIN { printf "%.2f", a / b }')" \
            "$(awk -v a="${t2[borgmatic_lvm]}" -v b="${t2[xenbackup_unit]}" 'BEGIN { printf "%.2f", a / b }')"
    fi
    [ -z "$borgmatic_note" ] || echo "borgmatic: $borgmatic_note"
    [ ! -s /tmp/borgmatic-run.log ] || cp /tmp/borgmatic-run.log "$results/borgmatic-run.log"
    echo "snapshot lifetime vs restic's own time (s), lvcreate to lvremove; restic's time is its total_duration,"
    echo "which leaves out its start, key derivation and index load (the bare recipe's restic wall time in brackets):"
    for m in bare_restic xenbackup_unit xenbackup_fg; do
        read -r l1 r1 w1 <<<"${life1[$m]}"; read -r l2 r2 w2 <<<"${life2[$m]}"
        printf '  %-16s 1st: %s snapshot, %s restic%s (+%s)   2nd: %s snapshot, %s restic%s (+%s)\n' "$m" \
            "$l1" "$r1" "${w1:+ [$w1]}" "$(awk -v a="$l1" -v b="$r1" 'BEGIN { printf "%.1f", a - b }')" \
            "$l2" "$r2" "${w2:+ [$w2]}" "$(awk -v a="$l2" -v b="$r2" 'BEGIN { printf "%.1f", a - b }')"
    done
    cat /tmp/unit-journal.txt
    echo "fixed costs in the guest (bench/overhead.py):"
    python3 bench/overhead.py --vms 100 --repeat 3 || echo "bench/overhead.py failed"
} | tee "$out"
cp "$out" "$results/summary.txt"
