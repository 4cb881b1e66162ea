"""A config change takes effect without a reboot: `xenbackup reload` on real systemd."""

from __future__ import annotations

import time

from vmlib.product import MSG_SUCCEEDED, Journal, Xb, sh

CONFIG = """
[vm.vm1]
hypervisor = "none"
snapshot_size = "256M"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
"""


def active(unit: str) -> str:
    return sh("systemctl", "is-active", unit, check=False).stdout.strip()


def prop(unit: str, name: str) -> str:
    return sh("systemctl", "show", "-p", name, "--value", unit).stdout.strip()


def test_install_started_the_prune_and_verify_timers() -> None:
    for timer in ("xenbackup-prune.timer", "xenbackup-verify.timer"):
        assert sh("systemctl", "is-enabled", timer, check=False).stdout.strip() == "enabled"
        assert active(timer) == "active", prop(timer, "ActiveState")


def test_a_new_schedule_fires_after_reload_without_reboot_or_systemctl(seed_layout, xb: Xb,
                                                                       journal: Journal) -> None:
    xb.write_config(CONFIG)
    started = time.monotonic()
    sh("xenbackup", "reload")
    reload_seconds = time.monotonic() - started
    assert active("xenbackup@vm1.timer") == "inactive"

    # What a new user does: add a schedule, then one command. No daemon-reload, no systemctl start. The
    # schedule must not elapse before the reload and the checks after it are done; a fixed minute of lead
    # was mostly idle, so the lead follows what the first reload took here.
    lead = max(20.0, 3 * reload_seconds + 10)
    expr = "*-*-* " + time.strftime("%H:%M:%S", time.localtime(time.time() + lead))
    xb.write_config(CONFIG.replace("[vm.vm1]\n", f'[vm.vm1]\nschedule = "{expr}"\nrandomized_delay = "0"\n'))
    out = sh("xenbackup", "reload")
    assert "scheduled VMs: vm1" in out.stdout, out.stdout
    assert active("xenbackup@vm1.timer") == "active", journal.text("-t", "xenbackup")
    assert xb.snapshots() == [], "a backup ran before the schedule said so"

    deadline = time.monotonic() + 300
    while not [e for e in journal.entries("-u", "xenbackup@vm1.service") if e.get("MESSAGE_ID") == MSG_SUCCEEDED]:
        assert time.monotonic() < deadline, journal.text("-u", "xenbackup@vm1.service", "-u", "xenbackup@vm1.timer")
        time.sleep(3)
    assert prop("xenbackup@vm1.timer", "LastTriggerUSec") not in ("", "n/a", "0")
    assert [s["tags"] for s in xb.snapshots("vm:vm1", "mode:files")], "the timer's run stored nothing"

    # The schedule removed: the timer stops instead of falling back to the template's daily 20:00.
    xb.write_config(CONFIG)
    sh("xenbackup", "reload")
    assert active("xenbackup@vm1.timer") == "inactive"


def test_reload_starts_an_enabled_prune_timer_that_is_not_running(xb: Xb) -> None:
    xb.write_config(CONFIG)
    sh("systemctl", "stop", "xenbackup-prune.timer")
    try:
        assert active("xenbackup-prune.timer") == "inactive"
        out = sh("xenbackup", "reload")
        assert active("xenbackup-prune.timer") == "active", out.stdout + out.stderr
    finally:
        sh("systemctl", "start", "xenbackup-prune.timer", check=False)
