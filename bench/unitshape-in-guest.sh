#!/bin/bash
# Runs inside the test bed guest (host flavour): what the unit's shape costs without any of xenbackup's work.
# Copies of xenbackup@.service whose three Exec lines run `true` (systemd's cost of the unit and its three
# processes), the same without the hardening lines (what the sandbox costs per run), and the same with
# `python3 -c pass` (three bare interpreters), and with `python3 -S -c pass` (three interpreters started as the
# Debian package's /usr/bin/xenbackup starts them, without the site module). Warm, ten starts each, alternating.
#   tests/vm/run-guest script --flavour host bench/unitshape-in-guest.sh
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
template=/lib/systemd/system/xenbackup@.service
[ -e "$template" ] || template=/etc/systemd/system/xenbackup@.service
hardening='^(NoNewPrivileges|LockPersonality|RestrictRealtime|RestrictNamespaces|ProtectHostname|RestrictAddressFamilies|SystemCallArchitectures|SystemCallFilter|SystemCallErrorNumber|Nice|CPUWeight|IOWeight|IOSchedulingClass)='
make_unit() {  # name, command, keep hardening (1/0)
    sed -E -e "s|^(ExecStartPre\|ExecStart\|ExecStopPost)=.*|\1=$2|" -e '/^OnFailure=/d' \
        -e '/^LoadCredential=/d' "$template" > "/run/systemd/system/$1.service"
    [ "$3" = 1 ] || sed -Ei "/$hardening/d" "/run/systemd/system/$1.service"
}
make_unit shape-true-hardened /bin/true 1
make_unit shape-true-plain /bin/true 0
make_unit shape-python-hardened "/usr/bin/python3 -c pass" 1
make_unit shape-python-plain "/usr/bin/python3 -c pass" 0
make_unit shape-python-nosite "/usr/bin/python3 -S -c pass" 1
systemctl daemon-reload
TIMEFORMAT=%R
{
for round in 1 2 3 4 5 6 7 8 9 10; do
    for unit in shape-true-hardened shape-true-plain shape-python-hardened shape-python-plain shape-python-nosite; do
        t=$( { time systemctl start "$unit.service" >/dev/null 2>&1; } 2>&1 )
        echo "$unit $t"
    done
done
} > "$results/unitshape.txt" 2>&1
python3 "$(dirname "$0")/medians.py" "$results/unitshape.txt" | tee "$results/unitshape-summary.txt"
