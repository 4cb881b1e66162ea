"""N hosts back up to one Ceph RGW bucket at once: wall time, each unit's time and the lock waits, N = 1, 2, 4, 8.

Each host is a config with its own `host =` and a 16 MiB block-mode VM (random data), started as
`xenbackup@vmN.service` with XENBACKUP_CONFIG in a drop-in, like the fleet suite's tests. Every round writes
to a fresh bucket, so the rounds differ only in N.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vmlib.ceph import start_cluster
from vmlib.cmd import run
from vmlib.fleet import (
    Host,
    Repo,
    daemon_reload,
    fleet_volume_group,
    remove_drop_ins,
    runs_by_host,
    unit_state,
    write_shared_secrets,
)
from vmlib.product import Journal
from vmlib.storage import BLANK_DISKS, clear_disk

RESULTS = Path("/mnt/results")


def unit_seconds(host: Host) -> float:
    """The run's duration from the host's last-run record (systemd forgets an inactive unit's timestamps once
    it unloads it)."""
    record = json.loads((Path("/var/lib/xenbackup") / host.name / f"{host.vm}.json").read_text())
    return float(record["duration"])


def round_of(n: int, endpoint_url: str) -> dict[str, object]:
    repo = Repo(f"{endpoint_url}-{n}")
    hosts = [Host(f"xen{i}", f"vm{i}") for i in range(1, n + 1)]
    for host in hosts:
        host.write_config(repo)
    daemon_reload()
    hosts[0].xenbackup("init")
    journal = Journal()
    started = time.monotonic()
    for host in hosts:
        run("systemctl", "start", "--no-block", host.unit)
    for host in hosts:
        while unit_state(host.unit) not in ("inactive", "failed"):
            time.sleep(0.5)
    wall = time.monotonic() - started
    failed = [h.unit for h in hosts if unit_state(h.unit) != "inactive"]
    waits = [e for h in hosts for e in journal.entries("-u", h.unit) if "XENBACKUP_LOCK_PID" in e]
    per_unit = sorted(unit_seconds(h) for h in hosts)
    runs = runs_by_host(repo)
    remove_drop_ins([h.unit for h in hosts])
    return {"n": n, "wall_s": round(wall, 1), "unit_min_s": round(per_unit[0], 1),
            "unit_max_s": round(per_unit[-1], 1), "unit_mean_s": round(sum(per_unit) / n, 1),
            "lock_waits": len(waits), "failed": failed, "runs": sum(runs.values())}


def main() -> int:
    counts = [int(a) for a in sys.argv[1:]] or [1, 2, 4, 8]
    clear_disk(BLANK_DISKS[2])
    cluster = start_cluster(BLANK_DISKS[2])
    print(f"Ceph up: {cluster.timings}", flush=True)
    write_shared_secrets(cluster.user.environment())
    rows = []
    with fleet_volume_group(BLANK_DISKS[1], tuple(f"vm{i}" for i in range(1, max(counts) + 1))):
        for n in counts:
            row = round_of(n, cluster.url("bench"))
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = [f"Ceph up (S3 user made) after {cluster.timings['S3 user']:.0f} s: {cluster.timings}", "",
             "| N hosts at once | wall (s) | per unit min / mean / max (s) | wall / N=1 | lock waits | runs stored |",
             "| ---: | ---: | --- | ---: | ---: | ---: |"]
    base = float(rows[0]["wall_s"])  # type: ignore[arg-type]
    for row in rows:
        lines.append(f"| {row['n']} | {row['wall_s']} | {row['unit_min_s']} / {row['unit_mean_s']} / "
                     f"{row['unit_max_s']} | {float(row['wall_s']) / base:.2f} | {row['lock_waits']} | "  # type: ignore[arg-type]
                     f"{row['runs']} |" + (f" FAILED: {row['failed']}" if row["failed"] else ""))
    text = "\n".join(lines) + "\n"
    print(text)
    if RESULTS.is_dir():
        (RESULTS / "summary.txt").write_text(text)
        (RESULTS / "fleet-bench.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if any(row["failed"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
