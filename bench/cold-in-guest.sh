#!/bin/bash
# Runs inside the test bed guest (host flavour): what a program costs to start with the page cache dropped
# (as `make bench` drops it before every run) and warm: the interpreter, the stdlib modules a step uses, a
# step's imports, restic, lvs and a systemd unit. Three rounds.
#   tests/vm/run-guest script --flavour host bench/cold-in-guest.sh
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
TIMEFORMAT=%R
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; local t; t=$( { time "$@" >/dev/null 2>&1; } 2>&1 ); echo "$t  $*"; }
warm() { local t; t=$( { time "$@" >/dev/null 2>&1; } 2>&1 ); echo "$t  (warm) $*"; }
{
for r in 1 2 3; do
cold python3 -c pass
warm python3 -c pass
cold python3 -S -c pass
cold python3 -c 'import logging, argparse, subprocess, json, tomllib, dataclasses'
cold python3 -c 'import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context'
warm python3 -c 'import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context'
cold restic version
cold lvs
cold true
cold systemd-run --wait -q true
warm systemd-run --wait -q true
cold systemd-run --wait -q python3 -c pass
done
} > "$results/cold.txt" 2>&1
cat "$results/cold.txt"
