#!/bin/bash
# Runs inside the test bed guest (host flavour): what the unit's I/O scheduling class costs its own runs.
# Unchanged runs of xenbackup@vm1 with a drop-in for each class, alternating, page caches dropped before
# each; per run the wall time and, from the journal, the stretch from systemd's "Starting" to the step's
# first line (the interpreter reading Python and its modules from disk).
#   tests/vm/run-guest script --flavour host bench/unit-io-in-guest.sh [ROUNDS]
set -euo pipefail
export LC_ALL=C
results=${XBTEST_RESULTS:-/mnt/results}
rounds=${1:-3}
. "$(dirname "$0")/python-library-layout.sh"
systemctl start xenbackup@vm1.service  # the first run: everything after it is unchanged

dropin=/run/systemd/system/xenbackup@vm1.service.d
mkdir -p "$dropin"
set_class() {
    case $1 in
    idle) printf '[Service]\nIOSchedulingClass=idle\n' ;;
    best-effort-7) printf '[Service]\nIOSchedulingClass=best-effort\nIOSchedulingPriority=7\n' ;;
    esac >"$dropin/io.conf"
    systemctl daemon-reload
}
first_line() {  # seconds from "Starting" to the step's first line, in the last run
    journalctl -u xenbackup@vm1.service -o json --since "@${1%.*}" | python3 -c 'import json, sys
t = [json.loads(l) for l in sys.stdin]
i = max(i for i, e in enumerate(t) if str(e.get("MESSAGE", "")).startswith("Starting"))
start = int(t[i]["__REALTIME_TIMESTAMP"])
first = next(int(e["__REALTIME_TIMESTAMP"]) for e in t[i:] if e.get("SYSLOG_IDENTIFIER") == "xenbackup")
print("%.2f" % ((first - start) / 1e6))'
}

{
    echo "scheduler of the root disk: $(cat /sys/block/vda/queue/scheduler)"
    printf '%-16s %5s %9s %18s\n' class round "wall (s)" "to first line (s)"
    for r in $(seq "$rounds"); do
        for class in idle best-effort-7; do
            set_class "$class"
            sync; echo 3 > /proc/sys/vm/drop_caches
            s=$(date +%s.%N)
            systemctl start xenbackup@vm1.service
            e=$(date +%s.%N)
            printf '%-16s %5s %9.1f %18s\n' "$class" "$r" "$(awk -v s="$s" -v e="$e" 'BEGIN { print e - s }')" \
                "$(first_line "$s")"
        done
    done
    systemctl show -p IOSchedulingClass,IOSchedulingPriority xenbackup@vm1.service
} | tee "$results/unit-io.txt"
