#!/bin/bash
# Runs inside the test bed guest (host flavour): whether asking the kernel for whole files ahead
# (posix_fadvise WILLNEED) shortens a prepare step's cold start. Each variant starts the interpreter without
# `site`, spawns `restic cat config` first thing (as the step's key check head start does), imports a step's
# modules, and waits for restic; then `restic version` alone, with and without its binary read by `dd` first.
# The page cache is dropped before every run; rounds alternate the variants.
#   tests/vm/run-guest script --flavour host bench/prefetch-in-guest.sh [ROUNDS]
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
rounds=${1:-8}
dist=/usr/lib/python3/dist-packages
list=/var/tmp/prefetch.list
export RESTIC_REPOSITORY=/var/tmp/pf-repo RESTIC_PASSWORD_FILE=/var/tmp/pf-pw RESTIC_CACHE_DIR=/var/tmp/pf-cache
echo secret-for-bench > "$RESTIC_PASSWORD_FILE"
restic init -q >/dev/null
# Every file a step's imports read: the modules' compiled files and the extension modules they load.
python3 -S - "$dist" "$list" <<'PY'
import importlib.util, sys
dist, out = sys.argv[1:3]
sys.path.append(dist)
import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context  # noqa
files = []
for name, m in sorted(sys.modules.items()):
    spec = getattr(m, "__spec__", None)
    origin = getattr(spec, "origin", None) if spec else None
    if not origin or not origin.startswith("/"):
        continue
    files.append(importlib.util.cache_from_source(origin) if origin.endswith(".py") else origin)
open(out, "w").write("\n".join(files) + "\n")
PY
echo "modules: $(wc -l < "$list") files, $(cat "$list" | xargs du -cb | tail -1 | cut -f1) bytes"
ls -lL /usr/bin/restic "$(readlink -f /usr/bin/python3)"
cat > /var/tmp/pf.py <<'PY'
import os, sys, time
t0 = time.monotonic()
what = sys.argv[1].split(",")
def ahead(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    os.close(fd)
if "exe" in what:
    ahead(sys.executable)
if "restic" in what:
    ahead("/usr/bin/restic")
pid = os.posix_spawn("/usr/bin/restic", ["restic", "cat", "config", "-q"], os.environ,
                     file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
if "modules" in what:
    import _thread
    def _all():
        for p in open("/var/tmp/prefetch.list").read().split():
            ahead(p)
    _thread.start_new_thread(_all, ())
sys.path.append("/usr/lib/python3/dist-packages")
import xenbackup.cli, xenbackup.actions.backup, xenbackup.actions.context  # noqa
t1 = time.monotonic()
os.waitpid(pid, 0)
t2 = time.monotonic()
print(f"imports {t1 - t0:.3f} both {t2 - t0:.3f}")
PY
variants="none restic exe,restic exe,restic,modules"
for v in $variants; do python3 -S /var/tmp/pf.py "$v" >/dev/null || echo "FAIL $v"; done
TIMEFORMAT=%R
{
for _ in $(seq "$rounds"); do
    for v in $variants; do
        sync; echo 3 > /proc/sys/vm/drop_caches
        i0=$(awk '{print $1}' /sys/block/vda/stat)
        t=$( { time python3 -S /var/tmp/pf.py "$v" > /var/tmp/pf.out; } 2>&1 )
        i1=$(awk '{print $1}' /sys/block/vda/stat)
        read -r _ imports _ both < /var/tmp/pf.out
        echo "$v-wall $t"
        echo "$v-imports $imports"
        echo "$v-restic-done $both"
        echo "$v-reads $((i1 - i0))"
    done
    # restic's own cold start, its binary paged in by its faults or read first in large requests by dd.
    for v in restic-version dd-then-restic-version; do
        sync; echo 3 > /proc/sys/vm/drop_caches
        i0=$(awk '{print $1}' /sys/block/vda/stat)
        if [ "$v" = restic-version ]; then
            t=$( { time restic version >/dev/null; } 2>&1 )
        else
            t=$( { time { dd if=/usr/bin/restic of=/dev/null bs=4M status=none; restic version >/dev/null; }; } 2>&1 )
        fi
        i1=$(awk '{print $1}' /sys/block/vda/stat)
        echo "$v-wall $t"
        echo "$v-reads $((i1 - i0))"
    done
done
} > "$results/prefetch.txt"
python3 "$(dirname "$0")/medians.py" "$results/prefetch.txt" | sort | tee "$results/summary.txt"
