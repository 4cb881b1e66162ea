#!/bin/bash
# Runs inside the test bed guest (host flavour): what each lvcreate/lvremove option costs inside the
# copy-on-write window. The window's edges are the kernel's "change" uevents for the origin (its resume with
# the snapshot-origin table inside lvcreate, and without it inside lvremove), stamped by udevadm monitor on
# CLOCK_MONOTONIC, the clock the commands are timed with. Six rounds of each variant, every second one after
# dropping the page cache; results in lvprobe.txt. The "monitor-n" variant's lvremove runs with --noudevsync
# too (as the published table was measured), so compare its remove_head with the others' before its cow.
#   tests/vm/run-guest script --flavour host bench/lvprobe-in-guest.sh
set -uo pipefail
results=${XBTEST_RESULTS:-/mnt/results}
. "$(dirname "$0")/guest-volume.sh"
bench_volume 1536M
bench_dataset 100 200
origin=$(dmsetup info -c --noheadings -o blkdevname system-xenvm)
stdbuf -oL udevadm monitor --kernel --subsystem-match=block > /tmp/uev.txt &
mon=$!
sleep 1
python3 - "$origin" <<'PY' > "$results/lvprobe.txt" 2>&1
import re, subprocess, sys, time, statistics
origin = sys.argv[1]
def changes():
    return [float(m.group(1)) for m in (re.match(r"KERNEL\[([\d.]+)\]\s+change\s+\S+/" + origin + r" ", l) for l in open("/tmp/uev.txt")) if m]
def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)
noarchive = ["--config", "backup { archive = 0 }"]
variants = {"default": [], "monitor-n": ["--monitor", "n"], "autobackup-n": ["--autobackup", "n"],
            "noarchive": noarchive, "all": ["--monitor", "n", "--autobackup", "n", *noarchive]}
rm_variants = {"default": [], "monitor-n": ["--noudevsync"], "autobackup-n": ["--autobackup", "n"],
               "noarchive": noarchive, "all": ["--autobackup", "n", *noarchive]}
res = {k: [] for k in variants}
for rnd in range(6):
    for name, extra in variants.items():
        if rnd % 2:
            subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])
        before = len(changes())
        t0 = time.monotonic()
        run("lvcreate", "-q", "-y", "-s", "-L", "256M", "-n", "snap", *extra, "system/xenvm")
        t1 = time.monotonic()
        run("udevadm", "wait", "--timeout=10", "/dev/system/snap")
        t2 = time.monotonic()
        run("mount", "-o", "ro,noload", "/dev/system/snap", "/mnt")
        t3 = time.monotonic()
        run("umount", "/mnt")
        t4 = time.monotonic()
        run("lvremove", "-q", "-y", *rm_variants[name], "system/snap")
        t5 = time.monotonic()
        time.sleep(0.5)
        ch = changes()[before:]
        c1, c2 = (ch[0], ch[-1]) if len(ch) >= 2 else (float("nan"),) * 2
        row = dict(cold=rnd % 2, lvcreate=t1 - t0, create_tail=t1 - c1, link=t2 - t1, mount=t3 - t2, umount=t4 - t3,
                   lvremove=t5 - t4, remove_head=c2 - t4, cow=c2 - c1, events=len(ch))
        res[name].append(row)
        print(name, " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
for cold in (0, 1):
    print("cold" if cold else "warm", "medians:")
    for name, rows in res.items():
        rows = [r for r in rows if r["cold"] == cold]
        print(f"  {name:<13}", " ".join(f"{k}={statistics.median(r[k] for r in rows):.3f}" for k in
              ("lvcreate", "create_tail", "link", "mount", "umount", "lvremove", "remove_head", "cow")))
PY
kill $mon
cp /tmp/uev.txt "$results/"
cat "$results/lvprobe.txt"
