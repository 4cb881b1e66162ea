"""Back up a two-disk PV guest by discovery, at one instant: the pause window, its faults and a full restore.

One guest, db1, serves the whole module (one boot of it): its init writes a
counter to xvda and then to xvdb (vmlib.counterguest), so two restored disks
whose counters are not (n, n) or (n, n - 1) come from two different instants.
Its config names xvda positionally as /dev/xb-db/db1-root and xvdb with
key=value syntax as /dev/mapper/xb--db-db1--data; the product's config has no
`disks` key, so every backup here goes through discovery.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vmlib import xen
from vmlib.cmd import run
from vmlib.counterguest import (
    CounterGuest,
    boot_hashes,
    counter_guest,
    holds_together,
    is_paused,
    parse_counter,
)
from vmlib.product import PASSWORD, REPO, TCG_MAX_PAUSE, Journal, Xb, our_mounts, our_snapshots, remove_state, sh
from vmlib.storage import BLANK_DISKS

UNIT = "xenbackup@db1.service"
METRICS = Path("/var/lib/prometheus/node-exporter/xenbackup.prom")  # the default metrics_file


@pytest.fixture(scope="module")
def db1(xen_dom0: None, domu_initramfs: Path) -> Iterator[CounterGuest]:
    with counter_guest(BLANK_DISKS[1], xen.domu_kernel(), domu_initramfs) as guest:
        yield guest


def reset_product() -> None:
    """No repository, config or run records. Unlike the `xb` fixture no daemon-reload (20 s under TCG):
    these configs have no schedule, so the generator has nothing to change."""
    for action in ("stop", "reset-failed"):
        sh("systemctl", action, UNIT, check=False)
    remove_state()


@pytest.fixture
def product(db1: CounterGuest) -> Iterator[Xb]:
    """A clean product state for db1; the guest left running and unpaused for the next test."""
    reset_product()
    yield Xb(vm=db1.name)
    reset_product()
    if xen.domain_exists(db1.name) and is_paused(db1.name):
        run("xl", "unpause", db1.name)


def restic_env() -> dict[str, str]:
    return {**os.environ, "RESTIC_REPOSITORY": str(REPO), "RESTIC_PASSWORD_FILE": str(PASSWORD)}


def tag(snapshot: dict[str, object], key: str) -> str:
    tags = snapshot.get("tags") or []
    assert isinstance(tags, list)
    values = [t.split(":", 1)[1] for t in tags if isinstance(t, str) and t.startswith(f"{key}:")]
    assert len(values) == 1, f"snapshot {snapshot.get('short_id')}: tags {tags}"
    return values[0]


def new_run(xb: Xb, seen: set[str]) -> tuple[str, dict[str, dict[str, object]]]:
    """The one run of db1 not in `seen`: its ID and its restic snapshots by disk."""
    runs: dict[str, dict[str, dict[str, object]]] = {}
    for snapshot in xb.snapshots("vm:db1"):
        if tag(snapshot, "mode") == "config":  # the saved /etc/xen/db1.cfg
            continue
        runs.setdefault(tag(snapshot, "run"), {})[tag(snapshot, "disk")] = snapshot
    fresh = set(runs) - seen
    assert len(fresh) == 1, f"expected one new run, found {sorted(fresh)}"
    run_id = fresh.pop()
    seen.add(run_id)
    for snapshot in runs[run_id].values():
        assert tag(snapshot, "mode") == "block"
    return run_id, runs[run_id]


def dump_path(snapshot: dict[str, object]) -> str:
    paths = snapshot["paths"]
    assert isinstance(paths, list) and len(paths) == 1, paths
    return str(paths[0])


def dump_sha256(snapshot: dict[str, object]) -> str:
    out = subprocess.run(
        ["sh", "-c", 'restic dump "$1" "$2" | sha256sum', "sh", str(snapshot["id"]), dump_path(snapshot)],
        env=restic_env(), capture_output=True, text=True, timeout=300, check=True,
    )
    return out.stdout.split()[0]


def stored_counters(guest: CounterGuest, by_disk: dict[str, dict[str, object]]) -> tuple[int, int]:
    """The counters of both disks as one run stored them, read with `restic dump`.

    A restore to a spare LV per disk would read the same bytes at twice the cost under TCG; restoring a whole
    run with the product is proven by the `restore --stop` test below."""
    counters = []
    for disk in guest.disks:
        snapshot = by_disk[disk]
        sector = subprocess.run(
            ["sh", "-c", 'restic dump "$1" "$2" | head -c 512', "sh", str(snapshot["id"]), dump_path(snapshot)],
            env=restic_env(), capture_output=True, timeout=300, check=True,
        ).stdout
        counters.append(parse_counter(sector, f"{disk} of run {tag(snapshot, 'run')}"))
    return counters[0], counters[1]


def window_entries(journal: Journal) -> list[dict[str, object]]:
    return [e for e in journal.entries("-u", UNIT) if "XENBACKUP_PAUSE_SECONDS" in e]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.2)


def lvcreate_wrapper(directory: Path, body: str) -> Path:
    """An lvcreate for [commands] that runs `body` (shell) first, then the real lvcreate."""
    real = shutil.which("lvcreate")
    assert real is not None
    wrapper = directory / "lvcreate"
    wrapper.write_text(f"#!/bin/sh\n{body}\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def assert_left_clean(guest: CounterGuest) -> None:
    """What every fault must leave: none of our snapshots or mounts, the guest running, unpaused and writing."""
    assert our_snapshots() == [] and our_mounts() == []
    assert xen.domain_exists(guest.name)
    assert not is_paused(guest.name), f"{guest.name} left paused"
    guest.wait_advancing()


def test_the_counter_guest_holds_the_relation_only_at_one_instant(db1: CounterGuest) -> None:
    """The instrument: paused, db1's disks hold (n, n) or (n, n - 1); running, the counter moves on."""
    seen = []
    for _ in range(3):
        db1.wait_advancing()
        run("xl", "pause", db1.name)
        try:
            assert is_paused(db1.name)
            seen.append(db1.counters())
        finally:
            run("xl", "unpause", db1.name)
    print(f"db1 paused by hand: (xvda, xvdb) = {seen}")
    assert all(holds_together(a, b) for a, b in seen), seen
    assert seen[0][0] < seen[1][0] < seen[2][0], seen


def test_discovered_disks_are_snapshotted_at_one_instant(db1: CounterGuest, product: Xb, journal: Journal) -> None:
    product.write_config(f"[vm.{db1.name}]\nmax_pause = {TCG_MAX_PAUSE}\n")
    check = sh("xenbackup", "check-config", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    found = [line.strip() for line in check.stdout.splitlines() if line.startswith(f"  {db1.name}: ")]
    assert found == [
        f"{db1.name}: {db1.disks[0]} block (found: xvda: {db1.root})",
        f"{db1.name}: {db1.disks[1]} block (found: xvdb: {db1.data})",
    ], check.stdout

    runs: set[str] = set()
    seen = []
    for _ in range(2):
        db1.wait_advancing()
        assert product.start().returncode == 0, journal.text("-u", UNIT)
        _, by_disk = new_run(product, runs)
        assert sorted(by_disk) == sorted(db1.disks)
        seen.append(stored_counters(db1, by_disk))
    print(f"consistency auto (pause), stored (xvda, xvdb) = {seen}")
    assert all(holds_together(a, b) for a, b in seen), seen
    assert seen[0][0] < seen[1][0], f"the guest was not writing: {seen}"

    windows = window_entries(journal)
    assert {e.get("XENBACKUP_CONSISTENCY") for e in windows} == {"pause"}, windows
    paused_for = [float(str(e["XENBACKUP_PAUSE_SECONDS"])) for e in windows
                  if "was paused for" in str(e["MESSAGE"])]
    print(f"pause windows: {paused_for} s")
    assert len(paused_for) == 2 and all(0 < s < TCG_MAX_PAUSE for s in paused_for), windows
    metric = re.search(r'^xenbackup_last_pause_seconds\{vm="db1"\} (\S+)$', METRICS.read_text(), re.MULTILINE)
    assert metric is not None and abs(float(metric.group(1)) - paused_for[-1]) < 0.01, METRICS.read_text()
    assert_left_clean(db1)


def test_without_a_window_the_disks_come_from_different_instants(
    db1: CounterGuest, product: Xb, journal: Journal
) -> None:
    """consistency = "none": the same check fails, so it can fail.

    Measured under TCG (each lvcreate about 3 s), 2026-11-29: the first run without a window restored
    (xvda, xvdb) = (4002, 4049): xvda was snapshotted first and the guest wrote 47 more pairs before xvdb's
    snapshot. With the pause, three runs restored (437, 437), (1591, 1590) and (2710, 2710).
    """
    product.write_config(f'[vm.{db1.name}]\nconsistency = "none"\n')
    runs: set[str] = set()
    seen = []
    for _ in range(3):
        db1.wait_advancing()
        assert product.start().returncode == 0, journal.text("-u", UNIT)
        _, by_disk = new_run(product, runs)
        seen.append(stored_counters(db1, by_disk))
        if not holds_together(*seen[-1]):
            break
    print(f"consistency none, stored (xvda, xvdb) = {seen}")
    assert any(not holds_together(a, b) for a, b in seen), f"no skew without a window: {seen}"
    assert not [e for e in window_entries(journal) if "was paused for" in str(e["MESSAGE"])]
    assert_left_clean(db1)


def test_snapshot_step_killed_while_the_guest_is_paused(
    db1: CounterGuest, product: Xb, journal: Journal, tmp_path: Path
) -> None:
    wrapper = lvcreate_wrapper(tmp_path, "sleep 4")
    product.write_config(f'[vm.{db1.name}]\nmax_pause = 120\n[commands]\nlvcreate = "{wrapper}"\n')
    sh("systemctl", "start", "--no-block", UNIT)
    wait_until(lambda: is_paused(db1.name), "db1 paused by the snapshot step")
    sh("systemctl", "kill", "-s", "KILL", UNIT)
    assert product.wait_inactive() == "failed", journal.text("-u", UNIT)
    assert_left_clean(db1)
    assert product.snapshots() == []


def test_lvcreate_failing_on_the_second_disk(db1: CounterGuest, product: Xb, journal: Journal, tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    wrapper = lvcreate_wrapper(tmp_path, (
        f'n=$(( $(cat {calls} 2>/dev/null || echo 0) + 1 )); echo "$n" > {calls}\n'
        'if [ "$n" -eq 2 ]; then echo "injected failure of the second lvcreate" >&2; exit 5; fi'
    ))
    product.write_config(f'[vm.{db1.name}]\nmax_pause = {TCG_MAX_PAUSE}\n[commands]\nlvcreate = "{wrapper}"\n')
    assert product.start().returncode != 0
    assert calls.read_text().strip() == "2"
    assert "injected failure of the second lvcreate" in journal.text("-u", UNIT)
    assert_left_clean(db1)
    assert product.snapshots() == []


def test_max_pause_unpauses_fails_the_run_and_removes_its_snapshots(
    db1: CounterGuest, product: Xb, journal: Journal, tmp_path: Path
) -> None:
    wrapper = lvcreate_wrapper(tmp_path, "sleep 2")
    product.write_config(f'[vm.{db1.name}]\nmax_pause = 1\n[commands]\nlvcreate = "{wrapper}"\n')
    assert product.start().returncode != 0
    errors = [str(e["MESSAGE"]) for e in journal.entries("-u", UNIT, "-p", "err")]
    assert any("max_pause" in message for message in errors), journal.text("-u", UNIT)
    assert_left_clean(db1)
    assert product.snapshots() == []


def test_a_guest_the_admin_paused_stays_paused(db1: CounterGuest, product: Xb, journal: Journal) -> None:
    product.write_config(f"[vm.{db1.name}]\n")
    run("xl", "pause", db1.name)
    try:
        frozen = db1.counters()
        assert product.start().returncode == 0, journal.text("-u", UNIT)
        assert is_paused(db1.name)
        assert db1.counters() == frozen, "the guest ran during the backup"
        _, by_disk = new_run(product, set())
        assert stored_counters(db1, by_disk) == frozen
    finally:
        run("xl", "unpause", db1.name)
    assert_left_clean(db1)


def test_restore_stop_brings_back_both_disks_of_one_run_before_the_guest_starts(
    db1: CounterGuest, product: Xb, journal: Journal
) -> None:
    product.write_config(f"[vm.{db1.name}]\nmax_pause = {TCG_MAX_PAUSE}\n")
    assert product.start().returncode == 0, journal.text("-u", UNIT)
    _, by_disk = new_run(product, set())
    root, data = db1.disks
    expected = {"xvda": dump_sha256(by_disk[root]), "xvdb": dump_sha256(by_disk[data])}
    for device in (db1.root, db1.data):  # the guest never touches these MiBs; the restore must bring them back
        run("dd", "if=/dev/urandom", f"of={device}", "bs=1M", "seek=1", "count=2", "oflag=direct", "status=none")
    first = sh("xl", "domid", db1.name).stdout.strip()
    log = xen.console_log(db1.name)
    offset = log.stat().st_size

    restore = sh("xenbackup", "restore", db1.name, "--stop", check=False, timeout=900)
    assert restore.returncode == 0, restore.stdout + restore.stderr + journal.text("SYSLOG_IDENTIFIER=xenbackup")

    assert sh("xl", "domid", db1.name).stdout.strip() != first, "db1 was not restarted"
    deadline = time.monotonic() + 300
    while xen.READY not in (console := log.read_bytes()[offset:].decode(errors="replace")):
        assert time.monotonic() < deadline, f"db1 not ready after the restore:\n{console[-2000:]}"
        time.sleep(0.5)
    assert boot_hashes(console) == expected, console
    start_from = next(line for line in console.splitlines() if "XBDOMU-COUNTER-FROM:" in line)
    print(f"restored db1 booted with {boot_hashes(console)}, {start_from.strip()}")

    entries = journal.entries("SYSLOG_IDENTIFIER=xenbackup")
    verified = {str(e["MESSAGE"]).split()[0]: (i, e.get("XENBACKUP_SHA256")) for i, e in enumerate(entries)
                if "verified: sha256" in str(e["MESSAGE"])}
    started = [i for i, e in enumerate(entries) if e.get("XENBACKUP_PHASE") == "restore-start"]
    assert {disk: sha for disk, (_, sha) in verified.items()} == {root: expected["xvda"], data: expected["xvdb"]}
    assert started and max(i for i, _ in verified.values()) < min(started), [e["MESSAGE"] for e in entries]
    assert_left_clean(db1)

