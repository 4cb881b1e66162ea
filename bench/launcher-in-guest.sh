#!/bin/bash
# Runs inside the test bed guest (host flavour): the unit with the Debian package's /usr/bin/xenbackup
# against the unit as it ran before it, started through the console script pybuild writes (Python's site
# module, `import re`) with the config cache removed before every step (so every step imports tomllib and
# parses the config). Same boot, same small data set, alternating; warm runs, then runs after dropping the
# page cache. Reports the unit's wall time and the snapshot's lifetime (XENBACKUP_SNAPSHOT_SECONDS).
#   tests/vm/run-guest script --flavour host bench/launcher-in-guest.sh [WARM_RUNS] [COLD_RUNS]
set -euo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
warm_runs=${1:-8}
cold_runs=${2:-5}
disk=/dev/disk/by-id/virtio-xbtest1

wipefs -aq "$disk"
pvcreate -q "$disk"
vgcreate -q system "$disk"
lvcreate -q -y -L 256M -n xenvm system
mkfs.ext4 -q /dev/system/xenvm
mkdir -p /srv/xenvm
mount /dev/system/xenvm /srv/xenvm
mkdir -p /srv/xenvm/vm1
head -c 20M /dev/urandom > /srv/xenvm/vm1/disk.img
for i in $(seq 200); do echo "file $i" > "/srv/xenvm/vm1/f$i.txt"; done
sync
echo 'name = "vm1"' > /etc/xen-vm1.cfg
echo bench-password > /root/bench-pw
mkdir -p /etc/xenbackup
cat > /etc/xenbackup/xenbackup.toml <<TOML
[repository]
url = "/var/tmp/xb-repo"
password_file = "/root/bench-pw"
[vm.vm1]
domain_config = "/etc/xen-vm1.cfg"
snapshot_size = "128M"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
TOML
xenbackup init >/dev/null

# The command as it was: what pybuild generates for [project.scripts] (Debian 12), and no config cache.
cat > /usr/local/sbin/xenbackup-before <<'PY'
#!/usr/bin/python3
# -*- coding: utf-8 -*-
import re
import sys
from xenbackup.entry import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\.pyw|\.exe)?$", "", sys.argv[0])
    sys.exit(main())
PY
cat > /usr/local/sbin/xenbackup-before-step <<'SH'
#!/bin/sh
rm -f /run/xenbackup/.config-cache
exec /usr/local/sbin/xenbackup-before "$@"
SH
chmod +x /usr/local/sbin/xenbackup-before /usr/local/sbin/xenbackup-before-step
dropin=/run/systemd/system/xenbackup@vm1.service.d
use() {
    if [ "$1" = before ]; then
        mkdir -p "$dropin"
        printf '[Service]\nExecStartPre=\nExecStartPre=/usr/local/sbin/xenbackup-before-step step prepare %%i\nExecStart=\nExecStart=/usr/local/sbin/xenbackup-before-step step backup %%i\nExecStopPost=\nExecStopPost=/usr/local/sbin/xenbackup-before-step step cleanup %%i\n' > "$dropin/before.conf"
    else
        rm -rf "$dropin"
    fi
    systemctl daemon-reload
}
lifetime() {  # the last run's XENBACKUP_SNAPSHOT_SECONDS
    journalctl -u xenbackup@vm1.service -o json -n 200 | python3 -c '
import json, sys
found = [json.loads(l).get("XENBACKUP_SNAPSHOT_SECONDS") for l in sys.stdin]
print([f for f in found if f][-1])'
}
one() {  # kind, warm|cold
    use "$1"
    [ "$2" = warm ] || { sync; echo 3 > /proc/sys/vm/drop_caches; }
    local s e
    s=$(date +%s.%N)
    systemctl start xenbackup@vm1.service
    e=$(date +%s.%N)
    echo "$1-$2-wall $(python3 -c "print(round($e - $s, 3))")"
    echo "$1-$2-snapshot $(lifetime)"
}
use package; systemctl start xenbackup@vm1.service    # the first run stores everything once
: > "$results/launcher.txt"
for _ in $(seq "$warm_runs"); do for kind in package before; do one "$kind" warm >> "$results/launcher.txt"; done; done
for _ in $(seq "$cold_runs"); do for kind in package before; do one "$kind" cold >> "$results/launcher.txt"; done; done
journalctl -u xenbackup@vm1.service -o short-precise > "$results/launcher-journal.txt"
python3 "$(dirname "$0")/medians.py" "$results/launcher.txt" | sort | tee "$results/launcher-summary.txt"
