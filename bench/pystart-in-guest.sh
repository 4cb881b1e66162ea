#!/bin/bash
# Runs inside the test bed guest (host flavour): what an interpreter start costs with and without Python's
# site module, and the package's /usr/bin/xenbackup against the console script pybuild would write.
# Warm, twenty starts each, alternating.
#   tests/vm/run-guest script --flavour host bench/pystart-in-guest.sh
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
python3 -X importtime -c pass > "$results/importtime-site.txt" 2>&1
# What pybuild generates for [project.scripts] (Debian 12), for the comparison.
cat > /tmp/xenbackup-pybuild <<'PY'
#!/usr/bin/python3
# -*- coding: utf-8 -*-
import re
import sys
from xenbackup.entry import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\.pyw|\.exe)?$", "", sys.argv[0])
    sys.exit(main())
PY
chmod +x /tmp/xenbackup-pybuild
pass() { python3 -c pass; }
pass_nosite() { python3 -S -c pass; }
help_pybuild() { /tmp/xenbackup-pybuild --help; }
help_package() { /usr/bin/xenbackup --help; }
kinds="pass pass_nosite help_pybuild help_package"
for k in $kinds; do "$k" >/dev/null || echo "FAIL $k"; done
TIMEFORMAT=%R
{
for round in $(seq 20); do
    for k in $kinds; do
        t=$( { time "$k" >/dev/null 2>&1; } 2>&1 )
        echo "$k $t"
    done
done
} > "$results/pystart.txt"
python3 "$(dirname "$0")/medians.py" "$results/pystart.txt" | tee "$results/pystart-summary.txt"
