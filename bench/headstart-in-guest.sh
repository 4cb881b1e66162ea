#!/bin/bash
# Runs inside the test bed guest (host flavour): the unit whose prepare and backup steps start restic before
# they load their code (the commands left in /run/xenbackup/.headstart: the key check by the last run's backup
# step, the first `restic backup` by this run's prepare step) against the same unit with those commands
# removed before each step, which then starts restic once its code is loaded, as before. Both kinds' steps go
# through the same shell wrapper. Same boot, same small data set, alternating; warm runs, then runs after
# dropping the page cache. Reports the unit's wall time and the snapshot's lifetime.
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
    printf '[Service]\nExecStartPre=\nExecStartPre=/usr/local/sbin/xenbackup-%s step prepare %%i\nExecStart=\nExecStart=/usr/local/sbin/xenbackup-%s step backup %%i\n' "$1" "$1" > "$dropin/ab.conf"
    systemctl daemon-reload
}
ab_runs headstart headstart no-headstart "${1:-8}" "${2:-5}"
