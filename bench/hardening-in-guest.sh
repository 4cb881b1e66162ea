#!/bin/bash
# Runs inside the test bed guest (host flavour): what the unit's seccomp-based hardening costs under
# emulation. The unit as packaged against drop-ins that switch off its system call filter alone
# (`nofilter`), or every seccomp-based line (`noseccomp`: SystemCallFilter=, SystemCallArchitectures=,
# RestrictAddressFamilies=, RestrictNamespaces=, LockPersonality=, RestrictRealtime=). Same boot, the A/B data
# set, alternating; warm runs, then runs after dropping the page cache.
#   tests/vm/run-guest script --flavour host bench/hardening-in-guest.sh [WARM_RUNS] [COLD_RUNS]
set -euo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
. "$(dirname "$0")/ab-unit.sh"
ab_setup
dropin=/run/systemd/system/xenbackup@vm1.service.d
use() {
    mkdir -p "$dropin"
    rm -f "$dropin/ab.conf"
    case "$1" in
    nofilter) printf '[Service]\nSystemCallFilter=\n' > "$dropin/ab.conf" ;;
    noseccomp) printf '[Service]\nSystemCallFilter=\nSystemCallArchitectures=\nRestrictAddressFamilies=\n%s\n' \
        'RestrictNamespaces=no' 'LockPersonality=no' 'RestrictRealtime=no' > "$dropin/ab.conf" ;;
    esac
    systemctl daemon-reload
}
ab_runs nofilter packaged nofilter "${1:-5}" "${2:-4}"
ab_runs noseccomp packaged noseccomp "${1:-5}" "${2:-4}"
