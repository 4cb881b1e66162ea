#!/bin/bash
# Runs inside the test bed guest (host flavour): where a run's time goes. Three rounds, page caches dropped
# before each method: the bare recipe with each of its commands timed, then an unchanged run of
# xenbackup@vm1 with --debug (every command it spawns, with journal timestamps, lands in unit-journal.txt).
# Before the rounds: interpreter start and the backup step's imports (-X importtime, cProfile) in imports.txt.
#   tests/vm/run-guest script --flavour host bench/window-in-guest.sh
set -euo pipefail
export LC_ALL=C
results=${XBTEST_RESULTS:-/mnt/results}
. "$(dirname "$0")/python-library-layout.sh"
mkdir -p /mnt/vmbackup
# The guest's script runs without $HOME: restic by hand would then run without its local cache, which the
# unit has (CacheDirectory=).
export XDG_CACHE_HOME=/root/.cache
export RESTIC_PASSWORD_FILE=/root/bench-pw
restic -q -r /var/tmp/bare-repo init >/dev/null
TIMEFORMAT=%R
{
echo "== pyc present?"; ls /usr/lib/python3/dist-packages/xenbackup/__pycache__ | head -3
echo "== python -c pass x3"; for i in 1 2 3; do time python3 -c pass; done 2>&1
echo "== python -I -S -c pass x3"; for i in 1 2 3; do time python3 -I -S -c pass; done 2>&1
echo "== import cli+backup x3"; for i in 1 2 3; do time python3 -c 'import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context'; done 2>&1
echo "== importtime top self"
python3 -X importtime -c 'import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context' 2>&1 | sort -t'|' -k1.13n | tail -40
echo "== cProfile"
python3 -c "
import cProfile,pstats
cProfile.run('import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context','/tmp/prof')
pstats.Stats('/tmp/prof').sort_stats('tottime').print_stats(20)"
} > "$results/imports.txt" 2>&1
d() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
bare() {  # the seed's recipe, each command timed
  t0=$(date +%s.%N)
  lvcreate -q -y -s -L 256M -n vmbackup system/xenvm; t1=$(date +%s.%N)
  mount -o ro,noload /dev/system/vmbackup /mnt/vmbackup; t2=$(date +%s.%N)
  restic -q -r /var/tmp/bare-repo backup /mnt/vmbackup/vm1 >/dev/null; t3=$(date +%s.%N)
  umount /mnt/vmbackup; t4=$(date +%s.%N)
  lvremove -q -y system/vmbackup; t5=$(date +%s.%N)
  echo "bare: lvcreate $(d $t0 $t1) mount $(d $t1 $t2) restic $(d $t2 $t3) umount $(d $t3 $t4) lvremove $(d $t4 $t5) total $(d $t0 $t5)"
}
# --debug on every step: each spawned command is logged as it starts.
dropin=/run/systemd/system/xenbackup@vm1.service.d; mkdir -p $dropin
printf '[Service]\nExecStartPre=\nExecStartPre=xenbackup --debug step prepare %%i\nExecStart=\nExecStart=xenbackup --debug step backup %%i\nExecStopPost=\nExecStopPost=xenbackup --debug step cleanup %%i\n' > $dropin/debug.conf
systemctl daemon-reload
{
for r in 1 2 3; do
  sync; echo 3 > /proc/sys/vm/drop_caches; bare
  sync; echo 3 > /proc/sys/vm/drop_caches
  s=$(date +%s.%N); systemctl start xenbackup@vm1.service; e=$(date +%s.%N)
  echo "unit run $r: $(d $s $e)"
  python3 -c 'import json; r=json.load(open("/var/lib/xenbackup/state/vm1.json")); print("snapshot", r.get("snapshot_seconds"), "restic", r.get("restic_seconds"))'
done
} > "$results/window.txt" 2>&1
journalctl -u xenbackup@vm1.service -o short-precise > "$results/unit-journal.txt"
cat "$results/window.txt"
