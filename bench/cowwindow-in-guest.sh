#!/bin/bash
# Runs inside the test bed guest (host flavour): how long the kernel kept a classic snapshot's copy-on-write
# active, against restic's own time, for the bare recipe and for xenbackup@vm1, on the main bench's data set
# (page caches dropped before every run). The window is taken from the kernel's own events: device-mapper
# sends a "change" uevent each time it resumes a device, and the origin is resumed once with the
# snapshot-origin table (inside lvcreate) and once without it again (inside lvremove); between the two,
# every write of the VM to the origin first copies the old chunk to the snapshot. restic's wall time comes
# from a wrapper around the binary, the same for all methods. The unit runs twice a round: as configured by
# default ("unit") and with `dmeventd_monitoring = true` ("unitmon": LVM registers each snapshot with dmeventd,
# as it does by default), in turns.
#   tests/vm/run-guest script --flavour host bench/cowwindow-in-guest.sh [rounds] [MB] [small files]
set -euo pipefail
export LC_ALL=C
results=${XBTEST_RESULTS:-/mnt/results}
rounds=${1:-4}
. "$(dirname "$0")/guest-volume.sh"
bench_volume 1536M
mkdir -p /mnt/vmbackup
bench_dataset "${2:-300}" "${3:-2000}"
echo 'name = "vm1"' > /etc/xen-vm1.cfg
pw=/root/bench-pw
bench_config "$pw" 1G 'domain_config = "/etc/xen-vm1.cfg"'
log=/run/restic-times
cat > /usr/local/bin/restic-timed <<SH
#!/bin/sh
s=\$(cut -d' ' -f1 /proc/uptime)
/usr/bin/restic "\$@"
rc=\$?
echo "\$s \$(cut -d' ' -f1 /proc/uptime) \$*" >> $log
exit \$rc
SH
chmod 0755 /usr/local/bin/restic-timed
printf '[commands]\nrestic = "/usr/local/bin/restic-timed"\n' >> /etc/xenbackup/xenbackup.toml
{ cat /etc/xenbackup/xenbackup.toml; printf '[settings]\ndmeventd_monitoring = true\n'; } > /etc/xenbackup/monitored.toml
export XDG_CACHE_HOME=/root/.cache RESTIC_PASSWORD_FILE=$pw
restic -q -r /var/tmp/bare-repo init >/dev/null
xenbackup init >/dev/null
: > $log
up() { cut -d' ' -f1 /proc/uptime; }
origin=$(dmsetup info -c --noheadings -o blkdevname system-xenvm)
stdbuf -oL udevadm monitor --kernel --subsystem-match=block > /tmp/uevents.txt &
monitor=$!
sleep 1
runs=/tmp/cow-runs.txt; : > $runs
bare() {
    local a b
    a=$(up)
    lvcreate -q -y -s -L 1G -n vmbackup system/xenvm
    mount -o ro,noload /dev/system/vmbackup /mnt/vmbackup
    /usr/local/bin/restic-timed -r /var/tmp/bare-repo backup --json /mnt/vmbackup/vm1 | tail -1 >/tmp/bare-summary.json
    umount /mnt/vmbackup
    lvremove -q -y system/vmbackup
    b=$(up)
    echo "bare $1 $a $b $(python3 -c 'import json; print(json.load(open("/tmp/bare-summary.json"))["total_duration"])')" >> $runs
}
unit() {  # method name, round; XENBACKUP_CONFIG for the unit from the manager's environment
    local a b
    if [ "$1" = unitmon ]; then
        systemctl set-environment XENBACKUP_CONFIG=/etc/xenbackup/monitored.toml
    else
        systemctl unset-environment XENBACKUP_CONFIG
    fi
    a=$(up)
    systemctl start xenbackup@vm1.service
    b=$(up)
    echo "$1 $2 $a $b $(python3 -c 'import json; r = json.load(open("/var/lib/xenbackup/state/vm1.json"))
print(r["restic_seconds"], r["snapshot_seconds"])')" >> $runs
}
for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) = 1 ]; then order="bare unit unitmon"; else order="bare unitmon unit"; fi
    for m in $order; do
        sync; echo 3 > /proc/sys/vm/drop_caches
        if [ "$m" = bare ]; then bare "$r"; else unit "$m" "$r"; fi
    done
done
sleep 1
kill $monitor; wait $monitor 2>/dev/null || true
cp /tmp/uevents.txt $log $runs "$results/"
journalctl -u xenbackup@vm1.service -o short-monotonic > "$results/unit-journal.txt"
python3 - "$origin" /tmp/uevents.txt $log $runs <<'PY' | tee "$results/cowwindow.txt"
import re, statistics, sys
origin, uevents, restic_log, runs = sys.argv[1:]
changes = [float(m.group(1)) for m in
           (re.match(r"KERNEL\[([\d.]+)\]\s+change\s+\S+/" + re.escape(origin) + r" \(block\)", line)
            for line in open(uevents)) if m]
restics = []
for line in open(restic_log):
    start, end, *args = line.split()
    if "backup" in args:
        restics.append((float(start), float(end)))
rows = {}
print(f"origin {origin}; {len(changes)} change events; per run: the kernel's copy-on-write window (first to last "
      "origin resume), the run's own lifetime figure, restic's wall time and its total_duration (s)")
print(f"{'run':<8} {'wall':>6} {'events':>6} {'kernel':>7} {'lifetime':>8} {'restic wall':>11} {'restic td':>9} "
      f"{'kernel-wall':>11} {'kernel-td':>9} {'life-td':>8}")
for line in open(runs):
    method, n, a, b, td, *life = line.split()
    a, b, td = float(a), float(b), float(td)
    # the bare recipe's lifetime is its run, lvcreate's start to lvremove's end, as the unit's own figure is
    lifetime = b - a if method == "bare" else float(life[0])
    inside = [t for t in changes if a <= t <= b]
    kernel = inside[-1] - inside[0] if len(inside) >= 2 else float("nan")
    wall = sum(e - s for s, e in restics if a <= s <= b)
    row = (b - a, len(inside), kernel, lifetime, wall, td, kernel - wall, kernel - td, lifetime - td)
    # one first run per repository: the bare recipe's and the unit's (unitmon shares the unit's repository)
    rows.setdefault((method, n == "1" and method != "unitmon"), []).append(row)
    print(f"{method + ' ' + n:<8} {row[0]:6.2f} {row[1]:6d} " + " ".join(f"{v:{w}.2f}" for v, w in zip(row[2:], (7, 8, 11, 9, 11, 9, 8))))
print("medians (first run, then the unchanged runs):")
for (method, first), got in sorted(rows.items(), key=lambda kv: (not kv[0][1], kv[0][0])):
    cols = [statistics.median(c) for c in zip(*got)]
    print(f"  {method} {'1st' if first else 'unchanged':<9} n={len(got)} wall {cols[0]:.2f} kernel {cols[2]:.2f} "
          f"lifetime {cols[3]:.2f} restic wall {cols[4]:.2f} td {cols[5]:.2f}: kernel-wall {cols[6]:+.2f} "
          f"kernel-td {cols[7]:+.2f} lifetime-td {cols[8]:+.2f}")
PY
