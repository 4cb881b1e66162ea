"""Day-2 operations on real systemd: generated timers, prune, verify, status, metrics and alerts."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from vmlib.product import Journal, Xb, sh

ONE_VM = """
[settings]
metrics_file = "/run/xb-metrics/xenbackup.prom"
[vm.vm1]
snapshot_size = "256M"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
"""


def next_elapse(expr: str) -> str:
    out = sh("systemd-analyze", "calendar", expr).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Next elapse" in line)


def timer_next(unit: str) -> str:
    return sh("systemctl", "show", "-p", "NextElapseUSecRealtime", "--value", unit).stdout.strip()


def test_generator_turns_schedules_into_timers(seed_layout, xb: Xb, journal: Journal) -> None:
    for name in ("vmb", "vmc"):
        sh("lvcreate", "--yes", "-L", "32M", "-n", name, "system")
        sh("mkfs.ext4", "-q", f"/dev/system/{name}")
    soon = time.strftime("%H:%M:%S", time.localtime(time.time() + 45))
    schedules = {"vm1": f"*-*-* {soon}", "vmb": "Mon *-*-* 03:15:00", "vmc": "*-*-01 22:30:00"}
    try:
        xb.write_config("".join(
            f'[vm.{n}]\nschedule = "{expr}"\nrandomized_delay = "0"\nhypervisor = "none"\nsnapshot_size = "16M"\n'
            f'disks = [{{ lv = "system/{"xenvm" if n == "vm1" else n}", path = "{"vm1" if n == "vm1" else "."}" }}]\n'
            for n, expr in schedules.items()))
        sh("systemctl", "daemon-reload")
        sh("systemctl", "start", "timers.target")
        timers = sh("systemctl", "list-timers", "--all", "--no-pager", "xenbackup@*").stdout
        for name, expr in schedules.items():
            assert f"xenbackup@{name}.timer" in timers, timers
            assert timer_next(f"xenbackup@{name}.timer") == next_elapse(expr)
        # status reads the same timers, and the services beside them, in one `systemctl show` of two patterns.
        rows = {r["vm"]: r for r in status_json()[1]}
        for name in ("vmb", "vmc"):  # vm1's timer may elapse meanwhile
            # PID 1's own number, in µs ("t 1765077300000000"): systemctl prints it only as a date.
            unit_path = "/org/freedesktop/systemd1/unit/" + "".join(
                c if c.isalnum() else f"_{ord(c):02x}" for c in f"xenbackup@{name}.timer")
            raw = sh("busctl", "get-property", "org.freedesktop.systemd1", unit_path,
                     "org.freedesktop.systemd1.Timer", "NextElapseUSecRealtime").stdout.split()
            assert rows[name]["next_run"] == pytest.approx(int(raw[1]) / 1e6, abs=1), (rows[name], raw)
        assert rows["vmb"]["active_state"] == "inactive" and rows["vmb"]["result"] == "never"
        deadline = time.monotonic() + 240
        while not xb.snapshots("vm:vm1"):
            assert time.monotonic() < deadline, journal.text("-u", "xenbackup@vm1.service")
            time.sleep(3)
        # A broken expression: no timer for that VM, a journal line naming file and key, boot unaffected.
        xb.write_config(Path("/etc/xenbackup/xenbackup.toml").read_text().replace(
            'schedule = "Mon *-*-* 03:15:00"', 'schedule = "every blue moon"'))
        for name in schedules:
            sh("systemctl", "stop", f"xenbackup@{name}.timer", check=False)
        sh("systemctl", "daemon-reload")
        sh("systemctl", "start", "timers.target")
        assert sh("systemctl", "is-active", "xenbackup@vmb.timer", check=False).stdout.strip() == "inactive"
        assert sh("systemctl", "is-active", "xenbackup@vmc.timer", check=False).stdout.strip() == "active"
        assert "vm.vmb.schedule: invalid calendar expression" in journal.text("-k", "-b")
        check = sh("xenbackup", "check-config", check=False)
        assert check.returncode == 2 and "vm.vmb.schedule: invalid calendar expression" in check.stderr
        # PID 1 reports a failing generator; ours must never be one, whatever the config says.
        assert "xenbackup-generator failed" not in sh("journalctl", "-b", "_PID=1", "--no-pager").stdout
    finally:
        for name in schedules:
            sh("systemctl", "stop", f"xenbackup@{name}.timer", check=False)
        for name in ("vmb", "vmc"):
            sh("lvremove", "--yes", f"system/{name}", check=False)
        Path("/etc/xenbackup/xenbackup.toml").unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")


def test_prune_keeps_per_vm_and_never_touches_others(seed_layout, xb: Xb, journal: Journal) -> None:
    sh("lvcreate", "--yes", "-L", "32M", "-n", "vm2", "system")
    sh("mkfs.ext4", "-q", "/dev/system/vm2")
    try:
        xb.write_config(ONE_VM.replace('snapshot_size = "256M"', 'snapshot_size = "256M"\nkeep_last = 2') +
                        '[vm.vm2]\nhypervisor = "none"\nsnapshot_size = "16M"\nkeep_last = 2\n'
                        'disks = [{ lv = "system/vm2", path = "." }]\n')
        for _ in range(4):
            assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
        # Each run's backup step left the next run's prepare step its key check, and each backup step got its
        # restic from its own prepare step: both were started before the step loaded its code, and taken.
        ahead = [e.get("XENBACKUP_PHASE") for e in journal.entries("-u", "xenbackup@vm1")
                 if "s ahead, before this step loaded its code" in str(e.get("MESSAGE", ""))]
        assert ahead.count("backup") == 4 and ahead.count("snapshot") >= 3, ahead
        assert "started ahead" not in journal.text("-u", "xenbackup@vm1")
        assert xb.start("vm2").returncode == 0
        runs = {t for s in xb.snapshots("vm:vm1", "mode:files") for t in s["tags"] if t.startswith("run:")}
        assert len(runs) == 4
        sh("systemctl", "start", "xenbackup-prune.service", timeout=600)
        assert len(xb.snapshots("vm:vm1", "mode:files")) == 2
        assert len(xb.snapshots("vm:vm2", "mode:files")) == 1
        assert "now has" in journal.text("-u", "xenbackup-prune.service")
    finally:
        sh("lvremove", "--yes", "system/vm2", check=False)


def test_verify_restore_test_passes_then_catches_a_corrupt_pack(seed_layout, xb: Xb, journal: Journal) -> None:
    xb.write_config(ONE_VM)
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    ok = sh("xenbackup", "verify", "--restore-test", "vm1", check=False)
    assert ok.returncode == 0, ok.stderr
    assert "vm1: restore test of run" in ok.stdout and "passed" in ok.stdout
    packs = sorted(Path("/var/lib/xenbackup/repo/data").rglob("*"), key=lambda p: p.stat().st_size if p.is_file()
                   else 0)
    biggest = packs[-1]
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(biggest, 0o600)
    biggest.write_bytes(bytes(data))
    bad = sh("xenbackup", "verify", "--no-check", "--restore-test", "vm1", check=False)
    assert bad.returncode == 1
    assert "restore test of vm1 failed" in bad.stderr
    failed = sh("systemctl", "start", "xenbackup-verify.service", check=False, timeout=600)
    assert failed.returncode != 0
    sh("systemctl", "reset-failed", "xenbackup-verify.service", check=False)


def status_json() -> tuple[int, list[dict[str, object]]]:
    out = sh("xenbackup", "status", "--json", check=False)
    return out.returncode, json.loads(out.stdout)


def test_status_and_metrics_follow_real_runs(seed_layout, xb: Xb, journal: Journal) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    xb.write_config(ONE_VM)
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    code, rows = status_json()
    (row,) = rows
    assert code == 0 and row["result"] == "success" and row["ok"] is True
    assert row["unit_result"] == sh("systemctl", "show", "-p", "Result", "--value", "xenbackup@vm1.service"
                                    ).stdout.strip() == "success"
    assert row["bytes_total"] and row["files"] and row["peak_fill"] is not None
    metrics = Path("/run/xb-metrics/xenbackup.prom").read_text()
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["xenbackup_last_run_success"] == 1
    assert samples["xenbackup_last_run_files"] == row["files"]
    assert abs(samples["xenbackup_last_success_timestamp_seconds"] - time.time()) < 600

    xb.write_config(ONE_VM.replace('path = "vm1"', 'path = "no-such-dir"'))
    assert xb.start().returncode != 0
    code, rows = status_json()
    (row,) = rows
    assert code == 1 and row["ok"] is False and row["result"] == "exit-code"
    assert row["unit_result"] == sh("systemctl", "show", "-p", "Result", "--value", "xenbackup@vm1.service"
                                    ).stdout.strip() == "exit-code"
    metrics = Path("/run/xb-metrics/xenbackup.prom").read_text()
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["xenbackup_last_run_success"] == 0


def test_failure_alert_reaches_the_webhook(seed_layout, xb: Xb, journal: Journal) -> None:
    received: list[dict[str, object]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hook = f'[notify]\nwebhook = "http://127.0.0.1:{server.server_port}/hook"\n'
        xb.write_config(hook + ONE_VM.replace('snapshot_size = "256M"', 'snapshot_size = "256M"\n'
                                              'mount_options = ["no_such_option_xb"]'))
        assert xb.start().returncode != 0
        # The admin fixes the config and starts again at once: the alert must still describe the failed run,
        # not the unit's current (newer) invocation.
        xb.write_config(hook + ONE_VM)
        sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
        deadline = time.monotonic() + 120
        while not received:
            assert time.monotonic() < deadline, journal.text("-u", "xenbackup-notify@*")
            time.sleep(0.5)
        (msg,) = received
        assert msg["vm"] == "vm1" and msg["unit"] == "xenbackup@vm1.service" and msg["phase"] == "mount"
        assert msg["result"] == "exit-code"
        assert any("cannot mount" in str(line) for line in msg["lines"])  # type: ignore[union-attr]
        assert xb.wait_inactive() == "inactive", journal.text("-u", "xenbackup@vm1")
        assert len(received) == 1
    finally:
        server.shutdown()
    # A notifier that fails is logged once and not retried.
    xb.write_config('[notify]\nwebhook = "http://127.0.0.1:9/unreachable?token=hook-s3cr3t"\n' + ONE_VM.replace(
        'path = "vm1"', 'path = "nope"'))
    sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
    assert xb.start().returncode != 0
    time.sleep(10)
    notify_units = "xenbackup-notify@xenbackup@vm1.service"
    text = journal.text("-u", notify_units)
    assert text.count("webhook http://127.0.0.1:9/unreachable?*** failed") == 1, text
    assert "hook-s3cr3t" not in journal.text("-t", "xenbackup"), "the webhook's token reached the journal"
    subprocess.run(["systemctl", "reset-failed", notify_units], check=False)
