#!/bin/bash
# Runs inside the test bed guest (host flavour): the unit as packaged, whose ExecStopPost= shell confirms a
# good run's marker without starting Python, against the same unit with `ExecStopPost=xenbackup step cleanup
# %i`, whose step confirms the same marker in an interpreter (entry and handoff only) before it would load
# anything else. Same boot, same small data set, alternating; warm runs, then runs after dropping the page
# cache. Reports the unit's wall time and the snapshot's lifetime.
#   tests/vm/run-guest script --flavour host bench/stoppost-in-guest.sh [WARM_RUNS] [COLD_RUNS]
set -euo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
. "$(dirname "$0")/ab-unit.sh"
ab_setup

use() {
    if [ "$1" = python ]; then
        ab_dropin "$(printf '[Service]\nExecStopPost=\nExecStopPost=xenbackup step cleanup %%i\n')"
    else
        ab_dropin ""
    fi
}
ab_runs stoppost shell python "${1:-8}" "${2:-4}"
# From the backup step's verdict to the unit's end, per run: what the stop line costs after the snapshot is gone.
python3 - "$results/stoppost-journal.txt" <<'PY' | tee -a "$results/stoppost-summary.txt"
import datetime, statistics, sys
gaps, start = [], None
for line in open(sys.argv[1]):
    parts = line.split()
    if len(parts) < 4:
        continue
    at = datetime.datetime.strptime(parts[2], "%H:%M:%S.%f")
    if " succeeded in " in line:
        start = at
    elif "Deactivated successfully" in line and start is not None:
        gaps.append((at - start).total_seconds())
        start = None
# The runs alternate shell, python after one first run of the shell kind (warm, then cold).
for kind, got in (("shell", gaps[1::2]), ("python", gaps[2::2])):
    print(f"{kind}: verdict to unit end median {statistics.median(got):.3f} s, each", " ".join(f"{g:.3f}" for g in got))
PY
