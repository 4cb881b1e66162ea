#!/usr/bin/env python3
"""xenbackup's fixed costs that grow with neither the data nor the run: what each unit step imports, and
`xenbackup status` and the generator for a config of many VMs. Runs on the build machine
(PYTHONPATH=src python3 bench/overhead.py) and inside the test bed guest (bench/bench-in-guest.sh), with
fake state directories in a scratch directory; nothing touches LVM or a repository.

    python3 bench/overhead.py [--vms 100] [--repeat 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs one verb the way the unit does (a fresh interpreter, cli.main), against a config whose tools do
# not exist: every step gets as far as its first command, after all its imports.
CLI_PROBE = "import sys\nfrom xenbackup import cli\nsys.exit(cli.main(sys.argv[1:]))\n"

# The generator's own work: load the config, check every schedule with one systemd-analyze, write the
# drop-ins. The installed template is used where there is one (the guest), else the source tree's.
GENERATOR_PROBE = """import os, sys
from xenbackup import config, generator
template = generator.template_path() or sys.argv[2]
cfg = config.load(os.environ["XENBACKUP_CONFIG"])
enabled = generator.generate_checked(sys.argv[1], cfg, template, generator.kmsg)
assert len(enabled) == len(cfg.vms), (len(enabled), len(cfg.vms))
"""


def write_fleet(scratch: Path, vms: int) -> Path:
    """A config of `vms` VMs, each with a schedule, and a last-run record for each as a run leaves it."""
    state = scratch / "state"
    state.mkdir()
    lines = [
        "[repository]", f'url = "{scratch}/repo"', f'password_file = "{scratch}/pw"',
        "[settings]", f'runtime_dir = "{scratch}/run"', f'state_dir = "{state}"', 'metrics_file = ""',
        "[commands]", *(f'{tool} = "{scratch}/no-{tool}"' for tool in ("lvs", "vgs", "lvcreate", "restic")),
    ]
    now = time.time()
    for i in range(vms):
        name = f"vm{i:03d}"
        lines += [f"[vm.{name}]", f'schedule = "*-*-* {i % 24:02d}:{i % 60:02d}"', 'snapshot_size = "1G"',
                  f'disks = [{{ lv = "system/{name}", mode = "files", path = "{name}" }}]']
        record = {"vm": name, "result": "success", "finished": now - 3600, "run_id": f"r{i}",
                  "started": now - 3700, "duration": 100.0, "peak_fill": 3.5, "pause_seconds": None,
                  "snapshot_seconds": 98.0, "restic_seconds": 95.0, "restic_snapshots": ["0123abcd"],
                  "data_added": 1234, "total_bytes": 10 << 30, "files": 2000, "last_success": now - 3600}
        (state / f"{name}.json").write_text(json.dumps(record))
    cfg = scratch / "xenbackup.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def run_timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - start, out


def import_ms(stderr: str) -> float:
    """Total import time from -X importtime: the cumulative column of every top-level import."""
    total = 0
    for line in stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(fields) != 3 or "cumulative" in line:
            continue
        # A nested import is indented by two more spaces per level; the top level has one.
        if not fields[2].startswith("  "):
            total += int(fields[1])
    return total / 1000


def median_wall(argv: list[str], env: dict[str, str], repeat: int) -> float:
    return statistics.median(run_timed(argv, env)[0] for _ in range(repeat))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vms", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="xenbackup-bench-") as tmp:
        scratch = Path(tmp)
        cfg = write_fleet(scratch, args.vms)
        env = {**os.environ, "XENBACKUP_CONFIG": str(cfg)}
        env.pop("JOURNAL_STREAM", None)
        # The package's launcher starts each step without `site` and puts the package's directory on
        # sys.path itself; PYTHONPATH does that here, so a .pth of the machine's own Python is not counted.
        spec = importlib.util.find_spec("xenbackup")
        assert spec is not None and spec.origin is not None
        bare_env = {**env, "PYTHONPATH": str(Path(spec.origin).parents[1])}
        cli_probe = scratch / "cli_probe.py"
        cli_probe.write_text(CLI_PROBE)
        gen_probe = scratch / "gen_probe.py"
        gen_probe.write_text(GENERATOR_PROBE)
        template = str(ROOT / "units" / "xenbackup@.timer")

        def generator_argv() -> list[str]:
            out = tempfile.mkdtemp(dir=scratch)
            return [py, str(gen_probe), out, template]

        verbs: list[tuple[str, list[str]]] = [
            (f"step {step}", [py, str(cli_probe), "step", step, "vm000"])
            for step in ("prepare", "backup", "cleanup")
        ]
        verbs += [("status", [py, str(cli_probe), "status", "--json"])]
        print(f"python {sys.version.split()[0]}; interpreter start (python3 -c pass): "
              f"{median_wall([py, '-c', 'pass'], env, args.repeat) * 1000:.0f} ms")
        print(f"{'verb':<16} {'imports (ms)':>12} {'wall (ms)':>10} {'imports -S (ms)':>16}")
        for label, argv in [*verbs, ("generator", [])]:
            def make() -> list[str]:
                return generator_argv() if label == "generator" else argv  # noqa: B023
            imports = statistics.median(
                import_ms(run_timed([py, "-X", "importtime", *make()[1:]], env)[1].stderr)
                for _ in range(args.repeat))
            wall = statistics.median(run_timed(make(), env)[0] for _ in range(args.repeat))
            bare = statistics.median(
                import_ms(run_timed([py, "-S", "-X", "importtime", *make()[1:]], bare_env)[1].stderr)
                for _ in range(args.repeat))
            print(f"{label:<16} {imports:>12.0f} {wall * 1000:>10.0f} {bare:>16.0f}")
        status_s, status = run_timed([py, str(cli_probe), "status", "--json"], env)
        rows = json.loads(status.stdout or "[]")
        if len(rows) != args.vms:
            print(f"status printed {len(rows)} rows for {args.vms} VMs: {status.stderr.strip()[-300:]}")
            return 1
        gen_s = median_wall(generator_argv(), env, args.repeat)
        status_s = median_wall([py, str(cli_probe), "status", "--json"], env, args.repeat)
        print(f"{args.vms} VMs: status {status_s * 1000:.0f} ms, generator {gen_s * 1000:.0f} ms "
              f"(median of {args.repeat}, whole process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
