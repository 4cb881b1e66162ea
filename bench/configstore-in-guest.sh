#!/bin/bash
# Runs inside the test bed guest (host flavour): a VM with one block-mode disk (32 MiB of random data on a
# 64 MiB LV) and a domain config, backed up by its unit with the package as installed ("now") against an
# earlier xenbackup package tree ("before"), in one boot. The earlier tree is bind-mounted over the installed
# package directory, so both run as the same unit. Runs go in blocks of one kind: a first run whose result is
# dropped (each kind leaves its next run a different head start), then the measured ones. The blocks go
# before, now, now, before in each round, since a boot's runs drift (they got faster over one boot).
# Reports the unit's wall time, the snapshot's lifetime and how many restic runs opened the repository.
#   git worktree add /tmp/before REV && mkdir -p tests/vm/artifacts/ab-before &&
#     cp -r /tmp/before/src/xenbackup tests/vm/artifacts/ab-before/
#   tests/vm/run-guest script --flavour host bench/configstore-in-guest.sh [ROUNDS] [RUNS_PER_BLOCK]
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
rounds=${1:-3}
per_block=${2:-2}
before=/mnt/src/tests/vm/artifacts/ab-before/xenbackup
[ -d "$before" ] || { echo "no earlier package tree at $before" >&2; exit 1; }
. "$(dirname "$0")/guest-volume.sh"
wipefs -aq "$disk"
pvcreate -q "$disk"
vgcreate -q system "$disk"
lvcreate -q --yes -L 64M -n cfgvm system >/dev/null
dd if=/dev/urandom of=/dev/system/cfgvm bs=1M count=32 oflag=direct status=none
mkdir -p /etc/xen /var/tmp/ab
echo "name = 'vm1'" > /etc/xen/vm1.cfg
installed=/usr/lib/python3/dist-packages/xenbackup
cp -r "$before" /var/tmp/ab/before
# restic behind a wrapper that notes each command line: which of them open the repository.
printf '#!/bin/sh\necho "$*" >> /run/restic-calls\nexec /usr/bin/restic "$@"\n' > /usr/local/bin/restic-noted
chmod 755 /usr/local/bin/restic-noted
echo bench-password > /root/bench-pw
cat > /etc/xenbackup/xenbackup.toml <<'TOML'
[repository]
url = "/var/tmp/xb-repo"
password_file = "/root/bench-pw"
[commands]
restic = "/usr/local/bin/restic-noted"
[vm.vm1]
hypervisor = "none"
snapshot_size = "32M"
domain_config = "/etc/xen/vm1.cfg"
disks = [{ lv = "system/cfgvm", mode = "block" }]
TOML
xenbackup init >/dev/null
use() {
    if mountpoint -q "$installed"; then umount "$installed"; fi
    [ "$1" = before ] && mount --bind /var/tmp/ab/before "$installed"
    true
}
lifetime() {
    journalctl -u xenbackup@vm1.service -o json -n 200 | python3 -c '
import json, sys
found = [json.loads(l).get("XENBACKUP_SNAPSHOT_SECONDS") for l in sys.stdin]
print([f for f in found if f][-1])'
}
one() {  # kind, measured?
    : > /run/restic-calls
    local s e
    s=$(date +%s.%N)
    systemctl start xenbackup@vm1.service || echo "FAILED $1" >&2
    e=$(date +%s.%N)
    if [ "$2" = yes ]; then
        echo "$1-wall $(python3 -c "print(round($e - $s, 3))")"
        echo "$1-snapshot $(lifetime)"
        echo "$1-restic-runs $(grep -vc '^version' /run/restic-calls)"
    fi
    { echo "== $1"; cat /run/restic-calls; } >> "$results/restic-calls.txt"
}
use now; systemctl start xenbackup@vm1.service  # the first run stores everything once
: > "$results/configstore.txt"
for _ in $(seq "$rounds"); do
    for kind in before now now before; do
        use "$kind"
        one "$kind" no
        for _ in $(seq "$per_block"); do one "$kind" yes >> "$results/configstore.txt"; done
    done
done
use now
journalctl -u xenbackup@vm1.service -o short-precise > "$results/configstore-journal.txt"
python3 "$(dirname "$0")/medians.py" "$results/configstore.txt" | sort | tee "$results/summary.txt"
