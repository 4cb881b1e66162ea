"""Each verb imports only what it needs: every unit step is a fresh interpreter, so each import is paid per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

# Runs the verb in a fresh interpreter and reports, after main() returned, every module it had imported.
PROBE = """
import sys
from xenbackup import cli
rc = cli.main(sys.argv[1:])
loaded = sorted(sys.modules)
import json
with open(sys.argv[0] + ".out", "w") as f:
    json.dump({"rc": rc, "modules": loaded}, f)
"""

CONFIG = """
[repository]
url = "{tmp}/repo"
password_file = "{tmp}/pw"

[settings]
runtime_dir = "{tmp}/run"
state_dir = "{tmp}/state"
metrics_file = ""

[commands]
lvs = "{tmp}/missing-lvs"
systemd-analyze = "{tmp}/missing-systemd-analyze"

[vm.vm1]
snapshot_size = "1G"
schedule = "daily"
disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
"""

NEVER_IN_A_STEP = ("xenbackup.actions.restore", "xenbackup.actions.ops", "xenbackup.actions.listing",
                   "xenbackup.actions.notify", "xenbackup.actions.reload", "xenbackup.actions.plan",
                   "xenbackup.actions.hostcheck", "pystemd", "urllib.request", "xml.etree.ElementTree")


READ_PATH_ONLY = ("xenbackup.progress", "xenbackup.segfs", "xenbackup.actions.incremental")


def loaded_by(tmp_path: Path, *argv: str, under_journal: bool = False,
              runtime: Path | None = None) -> tuple[int, set[str]]:
    cfg = tmp_path / "xenbackup.toml"
    if not cfg.exists():
        cfg.write_text(CONFIG.format(tmp=tmp_path))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("JOURNAL_STREAM", None)
    env.pop("RUNTIME_DIRECTORY", None)
    if runtime is not None:
        env["RUNTIME_DIRECTORY"] = str(runtime)
    with open(tmp_path / "stderr", "wb") as stderr:
        if under_journal:
            # As systemd starts a unit's process: stderr is journald's stream, and JOURNAL_STREAM names it.
            st = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, str(probe), "--config", str(cfg), *argv], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=stderr, timeout=60)
    out = json.loads((tmp_path / "probe.py.out").read_text())
    return out["rc"], set(out["modules"])


@pytest.mark.parametrize("step", ["prepare", "snapshot", "mount", "backup", "cleanup"])
def test_a_unit_step_never_imports_restore_prune_or_dbus_code(tmp_path: Path, step: str) -> None:
    rc, mods = loaded_by(tmp_path, "step", step, "vm1")
    # Every step reached its action: snapshot fails at the missing lvs, the others find no run state.
    assert "xenbackup.actions.backup" in mods
    assert rc in (0, 1), rc
    assert sorted(m for m in NEVER_IN_A_STEP if m in mods) == []
    if step != "backup":
        # Only the backup step reads data: progress and the segment view are its own.
        assert sorted(m for m in READ_PATH_ONLY if m in mods) == []


def test_a_unit_s_next_step_takes_the_parsed_config_from_the_runtime_directory(tmp_path: Path) -> None:
    """Importing tomllib is the costliest single import of a step under emulation; one step per config pays it."""
    import time

    from xenbackup import tomlcache

    runtime = tmp_path / "unit-run"
    runtime.mkdir(mode=0o700)
    _, mods = loaded_by(tmp_path, "step", "prepare", "vm1", runtime=runtime)
    assert "tomllib" in mods and not (runtime / tomlcache.NAME).exists(), "a config this fresh is not cached"
    time.sleep(tomlcache.SETTLED_NS / 1e9 + 0.1)
    _, mods = loaded_by(tmp_path, "step", "prepare", "vm1", runtime=runtime)
    assert "tomllib" in mods and (runtime / tomlcache.NAME).stat().st_mode & 0o777 == 0o600
    for step in ("backup", "cleanup", "prepare"):
        rc, mods = loaded_by(tmp_path, "step", step, "vm1", runtime=runtime)
        assert "xenbackup.actions.backup" in mods and rc in (0, 1), rc
        assert "tomllib" not in mods, step
    # Outside a unit nothing is cached and nothing is read from a cache.
    _, mods = loaded_by(tmp_path, "step", "backup", "vm1")
    assert "tomllib" in mods


# pystemd's D-Bus object layer: its package __init__ imports these, and lxml with them.
PYSTEMD_DBUS_LAYER = ("pystemd.base", "pystemd.DBus", "pystemd.systemd1", "pystemd.machine1", "lxml.etree")


@pytest.mark.parametrize("step", ["prepare", "backup", "cleanup"])
def test_a_step_logging_to_the_journal_loads_pystemd_journal_but_not_its_dbus_layer(tmp_path: Path,
                                                                                     step: str) -> None:
    rc, mods = loaded_by(tmp_path, "step", step, "vm1", under_journal=True)
    assert rc in (0, 1), rc
    assert "pystemd.journal" in mods
    assert sorted(m for m in PYSTEMD_DBUS_LAYER if m in mods) == []


def test_status_imports_no_backup_or_restic_code(tmp_path: Path) -> None:
    _, mods = loaded_by(tmp_path, "status")
    assert "xenbackup.actions.status" in mods
    unwanted = ("xenbackup.actions.backup", "xenbackup.actions.restore", "xenbackup.repository",
                "xenbackup.actions.watch", "xenbackup.hypervisor", "xenbackup.discovery")
    assert sorted(m for m in unwanted if m in mods) == []


def test_the_generator_imports_no_action_code(tmp_path: Path) -> None:
    cfg = tmp_path / "xenbackup.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path))
    probe = tmp_path / "gen.py"
    probe.write_text("import sys, json\nfrom xenbackup import generator\ngenerator.main(sys.argv[1:])\n"
                     "mods = sorted(sys.modules)\nprint(json.dumps(mods))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "XENBACKUP_CONFIG": str(cfg)}
    out = subprocess.run([sys.executable, str(probe), str(tmp_path / "gen")], env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    mods = set(json.loads(out.stdout.splitlines()[-1]))
    assert "xenbackup.config" in mods
    assert sorted(m for m in mods if m.startswith("xenbackup.actions") or m in ("pystemd", "xenbackup.repository"))\
        == []
