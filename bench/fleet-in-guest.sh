#!/bin/bash
# Runs inside the test bed guest (host flavour, the fleet suite's machine): the scale figure of issue 12.
# A single-node Ceph RGW, then 1, 2, 4 and 8 "hosts" (configs with their own host = and VM) back up at
# once, each round to a fresh bucket. See bench/fleet-bench.py and BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=tests/vm/guest exec python3 bench/fleet-bench.py "$@"
