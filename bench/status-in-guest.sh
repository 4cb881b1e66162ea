#!/bin/bash
# Runs inside the test bed guest (host flavour): where `xenbackup status` for 100 VMs spends its time,
# warm: -X importtime of the whole command, a cProfile of its work, and its commands one by one.
#   tests/vm/run-guest script --flavour host bench/status-in-guest.sh
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
scratch=$(mktemp -d)
cfg=$(python3 - "$scratch" <<'PY'
import sys
sys.path.insert(0, "bench")
import overhead
from pathlib import Path
print(overhead.write_fleet(Path(sys.argv[1]), 100))
PY
)
export XENBACKUP_CONFIG=$cfg
TIMEFORMAT=%R
{
for r in 1 2 3; do
    t=$( { time xenbackup status --json >/dev/null 2>&1; } 2>&1 ); echo "status wall $t"
    t=$( { time python3 -c pass; } 2>&1 ); echo "python3 -c pass $t"
    t=$( { time python3 -I -c pass; } 2>&1 ); echo "python3 -I -c pass $t"
    t=$( { time python3 -c 'import xenbackup.cli' ; } 2>&1 ); echo "import xenbackup.cli $t"
    t=$( { time systemctl show --all --timestamp=unix -p Id,LoadState,NextElapseUSecRealtime -- 'xenbackup@*.service' 'xenbackup@*.timer' >/dev/null; } 2>&1 ); echo "systemctl show $t"
done
python3 -X importtime -c 'import sys; from xenbackup import cli; sys.exit(cli.main(["status","--json"]))' 2>"$scratch/imp" >/dev/null
echo "--- importtime, top 45 cumulative"
sort -t'|' -k2 -n "$scratch/imp" | tail -45
echo "--- cProfile"
python3 - <<'PY'
import cProfile, pstats, io, contextlib
from xenbackup import cli
pr = cProfile.Profile(); pr.enable()
with contextlib.redirect_stdout(io.StringIO()):
    cli.main(["status", "--json"])
pr.disable()
pstats.Stats(pr).sort_stats("cumulative").print_stats(35)
PY
echo "--- the step imports"
python3 -X importtime -c 'import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context' 2>"$scratch/imp2"
sort -t'|' -k2 -n "$scratch/imp2" | tail -45
python3 -X importtime -c 'pass' 2>&1 | sort -t'|' -k2 -n | tail -15
} > "$results/status-probe.txt" 2>&1
cat "$results/status-probe.txt"
