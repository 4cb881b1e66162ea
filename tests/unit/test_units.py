"""Static checks of the unit files; their behaviour is proven in the VM tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "units"
NAMESPACING = ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateMounts", "ReadWritePaths", "ReadOnlyPaths",
               "InaccessiblePaths", "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
               "PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "TemporaryFileSystem",
               "BindPaths", "RootDirectory", "ProtectProc", "ProcSubset", "ProtectKernelLogs")


def directives(name: str) -> list[tuple[str, str]]:
    out = []
    for line in (UNITS / name).read_text().replace("\\\n", " ").splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.append((key.strip(), value.strip()))
    return out


def test_service_runs_the_recipe_in_order() -> None:
    d = directives("xenbackup@.service")
    execs = [(k, v) for k, v in d if k.startswith("Exec")]
    assert execs[:2] == [
        ("ExecStartPre", "xenbackup step prepare %i"),
        ("ExecStart", "xenbackup step backup %i"),
    ]
    # Cleanup after a good run is a shell's check of the backup step's marker (test_snapshot_step runs it);
    # anything else is the cleanup step.
    ((key, stop_post),) = execs[2:]
    assert key == "ExecStopPost" and stop_post.startswith("/bin/sh -c ")
    assert stop_post.endswith("""else exec xenbackup step cleanup "$$1"; fi' xenbackup-cleanup %i""")
    assert ("Type", "oneshot") in d
    assert ("RuntimeDirectory", "xenbackup") in d and ("RuntimeDirectoryPreserve", "yes") in d
    assert any(k == "TimeoutStartSec" for k, _ in d), "oneshot units have no start timeout by default"


def test_service_has_no_mount_namespacing() -> None:
    # Any of these hides the ExecStartPre= mount from ExecStart= (verified on systemd 252).
    used = {k for k, _ in directives("xenbackup@.service")}
    assert not used.intersection(NAMESPACING)


def test_timer_defaults_to_daily_at_20() -> None:
    d = dict(directives("xenbackup@.timer"))
    assert d["OnCalendar"] == "*-*-* 20:00:00" and d["Persistent"] == "true"
    assert d["RandomizedDelaySec"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_timer_calendar_is_valid() -> None:
    cal = dict(directives("xenbackup@.timer"))["OnCalendar"]
    out = subprocess.run(["systemd-analyze", "calendar", cal], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "Normalized form: *-*-* 20:00:00" in out.stdout
