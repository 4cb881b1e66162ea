"""Every name xenbackup gives to things, built here and nowhere else: LVM tags and snapshot names, restic
tags, and systemd unit names. Cleanup deletes only what carries these tags, so they must never drift."""

from __future__ import annotations

import os
import re

TAG = "xenbackup"
"""On every snapshot LV and every restic snapshot xenbackup makes."""

# --- LVM ---

LV_VM_TAG_PREFIX = f"{TAG}-vm:"


def lv_vm_tag(vm: str) -> str:
    """The LVM tag every snapshot of this VM carries; cleanup removes only LVs with it."""
    return f"{LV_VM_TAG_PREFIX}{vm}"


def lv_tags(vm: str, run_id: str) -> list[str]:
    return [TAG, lv_vm_tag(vm), f"{TAG}-run:{run_id}"]


LV_BASE_TAG_PREFIX = f"{TAG}-base:"


def lv_base_tag(vm: str) -> str:
    """The tag of a thin snapshot kept as the next run's base. It has no xenbackup-vm: tag, so the sweep and
    the cleanup, which remove only LVs with that tag, keep it."""
    return f"{LV_BASE_TAG_PREFIX}{vm}"


def snapshot_lv(vm: str, origin_lv: str, stamp: str) -> str:
    """A unique, recognisable snapshot LV name, within LVM's 127-character limit."""
    base = f"{origin_lv}.xb-{vm}"
    return f"{base[:100]}-{stamp}"


# --- restic ---

CONFIG_DISK = "config"
"""The `disk:` and `mode:` tag value of the snapshot holding a run's domain config, when it has one of its own."""
CONFIG_INSIDE = "config:inside"
"""The tag of a disk's snapshot that also holds the run's domain config (at its own absolute path)."""


def config_rides_along(disk_path: str, config_path: str) -> bool:
    """Whether a files-mode disk's restic run can carry the domain config too, saving a second run.

    restic stores a relative target at the tree's root and an absolute one at its full path, so the two
    must not share a first component: restic would rename one of them (`etc-1`) and the path would lie.
    """
    first = os.path.normpath(disk_path).split("/")[0]
    config_first = os.path.normpath(config_path).lstrip("/").split("/")[0]
    return os.path.isabs(config_path) and first not in (".", "..", "") and first != config_first


def restic_tags(host: str, vm: str, disk: str, mode: str, run_id: str) -> list[str]:
    """The tags of one restic snapshot: one disk (or the domain config) of one run."""
    return [TAG, f"host:{host}", f"vm:{vm}", f"disk:{disk}", f"mode:{mode}", f"run:{run_id}"]


SEGMENTED_TAG = "layout:segments"
"""On a block-mode restic snapshot stored as segment files (changed-block incrementals of a thin LV)."""


def segment_file(index: int) -> str:
    """A segment file's name; zero-padded so that name order is device order."""
    return f"seg-{index:08d}"


def restic_filter(vm: str | None = None, *, run_id: str | None = None, disk: str | None = None,
                  host: str | None = None) -> list[str]:
    """Tags that select snapshots (restic ANDs the tags of one --tag option)."""
    tags = [TAG]
    for key, value in (("host", host), ("vm", vm), ("disk", disk), ("run", run_id)):
        if value is not None:
            tags.append(f"{key}:{value}")
    return tags


# --- systemd ---

SERVICE_TIMERS = ("xenbackup-prune.timer", "xenbackup-verify.timer")
TIMER_PATTERN = "xenbackup@*.timer"
SERVICE_PATTERN = "xenbackup@*.service"


def escape_instance(name: str) -> str:
    """The instance name as `systemd-escape` writes it."""
    out = []
    for i, ch in enumerate(name):
        if ch.isascii() and (ch.isalnum() or ch in "_:" or (ch == "." and i > 0)):
            out.append(ch)
        elif ch == "/":
            out.append("-")
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def unescape_instance(text: str) -> str:
    r"""Undo systemd-escape's \xNN escapes; VM names never contain '/', so '-' stays '-'."""
    # A run of escapes is one UTF-8 sequence: systemd-escape writes "ü" as \xc3\xbc.
    return re.sub(r"(?:\\x[0-9a-fA-F]{2})+",
                  lambda m: bytes.fromhex(m.group(0).replace("\\x", "")).decode(errors="replace"), text)


def service(vm: str) -> str:
    """The unit a VM's backups run in, escaped as its timer starts it (web-01 → xenbackup@web\\x2d01.service)."""
    return f"{TAG}@{escape_instance(vm)}.service"


def timer(vm: str) -> str:
    return f"{TAG}@{escape_instance(vm)}.timer"


def vm_of_unit(unit: str) -> str | None:
    """The VM of xenbackup@VM.service or .timer, unescaped; None for any other unit."""
    prefix = f"{TAG}@"
    if not unit.startswith(prefix):
        return None
    instance = unit.removeprefix(prefix).rsplit(".", 1)[0]
    return unescape_instance(instance) if instance else None
