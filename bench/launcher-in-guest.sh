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
. "$(dirname "$0")/ab-unit.sh"
ab_setup

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
ab_runs launcher package before "$warm_runs" "$cold_runs"
