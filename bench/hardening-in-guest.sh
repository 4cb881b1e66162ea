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
use() {
    case "$1" in
    nofilter) ab_dropin "$(printf '[Service]\nSystemCallFilter=\n')" ;;
    noseccomp) ab_dropin "$(printf '%s\n' '[Service]' SystemCallFilter= SystemCallArchitectures= \
        RestrictAddressFamilies= RestrictNamespaces=no LockPersonality=no RestrictRealtime=no)" ;;
    *) ab_dropin "" ;;
    esac
}
ab_runs nofilter packaged nofilter "${1:-5}" "${2:-4}"
ab_runs noseccomp packaged noseccomp "${1:-5}" "${2:-4}"
