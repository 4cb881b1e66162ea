"""Cutting the guest's power mid-test and finishing the test in the next boot.

`cut_power` resets the machine without syncing or unmounting, like pulling
the plug. The host harness sees the reboot request in the results share and
boots the guest again on the same disks with the same pytest arguments, so
the same test runs again; it finds the notes it left on the root disk and
knows it is in the boot after the power cut.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NoReturn

NOTES = Path("/var/lib/xenbackup-testbed/power-cut.json")
REBOOT_REQUEST = Path("/mnt/results/reboot-request")


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _write_durably(path: Path, text: str) -> None:
    """Only this file is made durable; the rest of the page cache is lost on the reset, as in a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_notes() -> dict[str, Any] | None:
    """What the boot before the power cut wrote down, or None in the first boot."""
    if not NOTES.exists():
        return None
    notes: dict[str, Any] = json.loads(NOTES.read_text())
    return notes


def forget_notes() -> None:
    NOTES.unlink(missing_ok=True)


def cut_power(notes: dict[str, Any]) -> NoReturn:
    """Write the notes, ask the host for another boot, and reset the machine at once (sysrq b)."""
    _write_durably(NOTES, json.dumps({**notes, "boot_id": boot_id()}))
    _write_durably(REBOOT_REQUEST, f"power cut by {os.environ.get('PYTEST_CURRENT_TEST', 'a test')}\n")
    Path("/proc/sysrq-trigger").write_text("b")
    time.sleep(120)
    raise AssertionError("the machine is still running 120 s after sysrq b")
