#!/bin/bash
# Runs inside the test bed guest (host flavour): the unit whose backup step starts restic before it loads
# its code (the command its prepare step left in /run/xenbackup/.headstart) against the same unit with that
# command removed before the backup step, which then starts restic once its code is loaded, as before. Both
# backup steps go through the same shell wrapper. Same boot, same small data set, alternating; warm runs,
# then runs after dropping the page cache. Reports the unit's wall time and the snapshot's lifetime.
#   tests/vm/run-guest script --flavour host bench/headstart-in-guest.sh [WARM_RUNS] [COLD_RUNS]
set -euo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
. "$(dirname "$0")/ab-unit.sh"
ab_setup

cat > /usr/local/sbin/xenbackup-headstart <<'SH'
#!/bin/sh
exec /usr/bin/xenbackup "$@"
SH
cat > /usr/local/sbin/xenbackup-no-headstart <<'SH'
#!/bin/sh
rm -rf /run/xenbackup/.headstart
exec /usr/bin/xenbackup "$@"
SH
chmod +x /usr/local/sbin/xenbackup-headstart /usr/local/sbin/xenbackup-no-headstart
dropin=/run/systemd/system/xenbackup@vm1.service.d
use() {
    mkdir -p "$dropin"
    printf '[Service]\nExecStart=\nExecStart=/usr/local/sbin/xenbackup-%s step backup %%i\n' "$1" > "$dropin/ab.conf"
    systemctl daemon-reload
}
ab_runs headstart headstart no-headstart "${1:-8}" "${2:-5}"
