#!/bin/bash
# Runs inside the test bed guest (host flavour): what a step's imports cost with the page cache dropped,
# read as Debian installs them (one .pyc file each) against the same compiled modules read from one zip:
# only xenbackup's own, or every module the step loads that is not frozen into the interpreter.
#   tests/vm/run-guest script --flavour host bench/bundle-in-guest.sh
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
TIMEFORMAT=%R
dist=/usr/lib/python3/dist-packages
imports='import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context'
python3 -S - "$dist" /var/tmp/own.zip /var/tmp/all.zip <<'PY'
import importlib.util, sys, zipfile
dist, own, every = sys.argv[1:4]
sys.path.append(dist)
before = set(sys.modules)
import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context  # noqa
loaded = [m for name, m in sorted(sys.modules.items()) if name not in before or name.startswith("encodings")]
with zipfile.ZipFile(own, "w", zipfile.ZIP_STORED) as o, zipfile.ZipFile(every, "w", zipfile.ZIP_STORED) as a:
    n = 0
    for m in loaded:
        spec = getattr(m, "__spec__", None)
        if spec is None or not spec.cached or not spec.origin or not spec.origin.endswith(".py"):
            continue
        name = spec.name.replace(".", "/") + ("/__init__" if spec.submodule_search_locations else "")
        pyc = importlib.util.cache_from_source(spec.origin)
        try:
            data = open(pyc, "rb").read()
        except OSError:
            import py_compile
            py_compile.compile(spec.origin, cfile="/tmp/x.pyc")
            data = open("/tmp/x.pyc", "rb").read()
        a.writestr(name + ".pyc", data)
        n += 1
        if spec.name.startswith("xenbackup"):
            o.writestr(name + ".pyc", data)
print("modules in all.zip:", n)
PY
ls -l /var/tmp/own.zip /var/tmp/all.zip
dirs() { python3 -S -c "import sys; sys.path.append('$dist'); $imports"; }
own() { python3 -S -c "import sys; sys.path.insert(0, '/var/tmp/own.zip'); sys.path.append('$dist'); $imports"; }
all() { python3 -S -c "import sys; sys.path.insert(0, '/var/tmp/all.zip'); sys.path.append('$dist'); $imports"; }
for k in dirs own all; do "$k" || echo "FAIL $k"; done
python3 -S -X importtime -c "import sys; sys.path.insert(0, '/var/tmp/all.zip'); sys.path.append('$dist'); $imports" 2>&1 | tail -3
reads() { awk '{print $3}' /sys/block/vda/stat; }
{
for round in 1 2 3 4 5 6; do
    for k in dirs own all; do
        sync; echo 3 > /proc/sys/vm/drop_caches
        r0=$(reads)
        t=$( { time "$k" >/dev/null 2>&1; } 2>&1 )
        r1=$(reads)
        echo "$k $t"
        echo "sectors_$k $((r1 - r0))"
    done
    for k in dirs own all; do
        t=$( { time "$k" >/dev/null 2>&1; } 2>&1 )
        echo "warm_$k $t"
    done
done
} > "$results/bundle.txt"
python3 "$(dirname "$0")/medians.py" "$results/bundle.txt" | tee "$results/summary.txt"
