from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xenbackup import config, generator
from xenbackup.actions.notify import failing_phase
from xenbackup.actions.ops import policy_for, prune_groups
from xenbackup.actions.status import render_metrics, vm_status
from xenbackup.config import RepositoryConfig
from xenbackup.model import Retention
from xenbackup.names import escape_instance
from xenbackup.repository import Restic
from xenbackup.systemd import TimerState, UnitFileState, UnitState

CFG = """
[defaults]
keep_daily = 7
[vm.vm1]
schedule = "*-*-* 20:00"
randomized_delay = "10min"
disks = [{ lv = "system/xenvm", path = "vm1" }]
[vm."web-01"]
schedule = "bogus o'clock"
hypervisor = "none"
disks = [{ lv = "system/web", mode = "block" }]
[vm.vm3]
keep_last = 2
disks = [{ lv = "system/vm3" }]
"""


def test_generator_writes_dropins_and_enables_only_valid_schedules(write_config, tmp_path: Path) -> None:
    cfg = config.load(str(write_config(CFG)))
    out = tmp_path / "gen"
    said: list[tuple[int, str]] = []
    enabled = generator.generate(str(out), cfg, "/usr/lib/systemd/system/xenbackup@.timer",
                                 lambda e: None if e.startswith("*") else "Failed to parse calendar specification",
                                 lambda lvl, text: said.append((lvl, text)))
    assert enabled == ["xenbackup@vm1.timer"]
    dropin = (out / "xenbackup@vm1.timer.d" / generator.DROPIN).read_text()
    assert "OnCalendar=\nOnCalendar=*-*-* 20:00\nRandomizedDelaySec=10min\n" in dropin
    link = out / "timers.target.wants" / "xenbackup@vm1.timer"
    assert os.readlink(link) == "/usr/lib/systemd/system/xenbackup@.timer"
    assert not (out / "timers.target.wants" / f"xenbackup@{escape_instance('web-01')}.timer").exists()
    assert said and said[0][0] == 3 and "vm.web-01.schedule: invalid calendar expression" in said[0][1]


def test_generator_never_fails_on_a_broken_config(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("[vm.vm1\n")
    monkeypatch.setenv("XENBACKUP_CONFIG", str(bad))
    assert generator.main([str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out").exists()


def test_escape_matches_systemd_escape() -> None:
    assert escape_instance("web-01") == "web\\x2d01"
    assert escape_instance("db.example") == "db.example"
    assert escape_instance("vm_1") == "vm_1"


def test_retention_falls_back_to_default_and_is_scoped(write_config) -> None:
    cfg = config.load(str(write_config(CFG)))
    assert policy_for(cfg.vm("vm3"), cfg.default_retention).forget_args() == ["--keep-last", "2"]
    assert policy_for(cfg.vm("vm1"), Retention()).forget_args() == ["--keep-daily", "7"]
    assert prune_groups(cfg.vm("vm1")) == ["system/xenvm", "config"]
    restic = Restic(RepositoryConfig("/r", "/p", None, "/c", "", "auto"), credentials_dir="")
    argv = restic.forget_policy_argv(["xenbackup", "host:h", "vm:vm3", "disk:system/vm3"], "h",
                                     cfg.vm("vm3").retention)
    assert argv == ["restic", "forget", "--host", "h", "--tag", "xenbackup,host:h,vm:vm3,disk:system/vm3",
                    "--group-by", "host", "--keep-last", "2"]


RECORD = {"result": "success", "finished": 1000.0, "last_success": 1000.0, "duration": 42.5, "data_added": 1234,
          "total_bytes": 99999, "files": 12, "peak_fill": 37.5}


def test_status_combines_record_unit_and_timer() -> None:
    unit = UnitState("xenbackup@vm1.service", "loaded", "inactive", "success", 0, "abc", 900_000_000, 1_000_000_000)
    timer = TimerState("xenbackup@vm1.timer", 2_000_000_000, 0)
    s = vm_status("vm1", RECORD, unit, timer, max_age_hours=48, now=2000.0)
    assert s.ok and s.result == "success" and s.next_run == 2000.0 and s.bytes_added == 1234
    old = vm_status("vm1", RECORD, unit, None, max_age_hours=1, now=1000.0 + 7200)
    assert old.stale and not old.ok


def test_status_sees_a_failure_pid1_recorded_after_ours() -> None:
    unit = UnitState("xenbackup@vm1.service", "loaded", "failed", "exit-code", 1, "abc", 0, 5_000_000_000)
    s = vm_status("vm1", RECORD, unit, None, max_age_hours=48, now=5001.0)
    assert s.result == "exit-code" and not s.ok


def test_status_json_says_why_the_last_run_failed() -> None:
    failed = {**RECORD, "result": "exit-code", "error": "restic failed with exit code 1 on repository r: Fatal: x"}
    assert vm_status("vm1", failed, None, None, 48, 1001.0).as_json()["error"].endswith("Fatal: x")
    assert vm_status("vm1", {**RECORD, "error": ""}, None, None, 48, 1001.0).as_json()["error"] == ""


def test_never_run_vm_is_not_a_failure() -> None:
    assert vm_status("vm9", None, None, None, 48, 0.0).ok


def test_metrics_parse_as_prometheus_text() -> None:
    text = render_metrics({"vm1": RECORD, 'we"ird': {**RECORD, "result": "exit-code"}, "never": None})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, s.labels["vm"]): s.value for f in families.values() for s in f.samples}
    assert samples[("xenbackup_last_success_timestamp_seconds", "vm1")] == 1000.0
    precise = render_metrics({"vm1": {**RECORD, "last_success": 1795698841.1953251}})
    assert "xenbackup_last_success_timestamp_seconds{vm=\"vm1\"} 1795698841.1953251" in precise
    assert samples[("xenbackup_last_run_bytes_added", "vm1")] == 1234
    assert samples[("xenbackup_snapshot_peak_fill_percent", "vm1")] == 37.5
    assert samples[("xenbackup_last_run_success", "vm1")] == 1
    assert samples[("xenbackup_last_run_success", 'we"ird')] == 0
    assert not any(vm == "never" for _, vm in samples)


def test_failing_phase_is_the_last_error() -> None:
    entries = [{"XENBACKUP_PHASE": "snapshot", "PRIORITY": "6"}, {"XENBACKUP_PHASE": "mount", "PRIORITY": "3"},
               {"XENBACKUP_PHASE": "cleanup", "PRIORITY": "6"}]
    assert failing_phase(entries) == "mount"
    final = [*entries, {"XENBACKUP_PHASE": "cleanup", "PRIORITY": "3", "MESSAGE": "backup of vm1 failed"}]
    assert failing_phase(final) == "mount"
    assert failing_phase([{"XENBACKUP_PHASE": "cleanup", "PRIORITY": "3"}]) == "cleanup"
    assert failing_phase([{"XENBACKUP_PHASE": "backup", "PRIORITY": "6"}]) == "backup"
    assert failing_phase([]) == "unknown"


def test_alert_names_the_run_systemd_says_failed(write_config, fake_bin, monkeypatch) -> None:
    from xenbackup.actions.notify import build_message

    entry = ('{"MESSAGE": "restic failed with exit code 1: connection refused", "PRIORITY": "3", '
             '"XENBACKUP_PHASE": "backup", "_SYSTEMD_INVOCATION_ID": "0123abcd"}')
    journalctl = fake_bin("journalctl", stdout=entry + "\n")
    cfg = config.load(str(write_config(f"""
        [commands]
        journalctl = "{journalctl}"
        [vm.vm1]
        disks = [{{ lv = "system/xenvm", path = "vm1" }}]
    """)))
    env = {"MONITOR_UNIT": "xenbackup@vm1.service", "MONITOR_INVOCATION_ID": "0123abcd",
           "MONITOR_SERVICE_RESULT": "exit-code"}
    msg = build_message(cfg, "xenbackup@vm1", env)
    assert (msg.vm, msg.result, msg.phase, msg.invocation_id) == ("vm1", "exit-code", "backup", "0123abcd")
    assert "_SYSTEMD_INVOCATION_ID=0123abcd" in fake_bin.calls.read_text()


def test_a_failing_webhook_is_logged_without_its_token(write_config, caplog) -> None:
    from xenbackup.actions.notify import FailureMessage, send

    cfg = config.load(str(write_config("""
        [notify]
        webhook = "http://127.0.0.1:9/hook?token=hook-s3cr3t"
        timeout = 5
        [vm.vm1]
        disks = [{ lv = "system/xenvm", path = "vm1" }]
    """)))
    msg = FailureMessage(vm="vm1", unit="xenbackup@vm1.service", host="h", result="exit-code", phase="backup",
                         invocation_id="", time=0.0, lines=[])
    caplog.set_level("INFO")
    assert send(cfg, msg) == ["webhook"]
    assert "webhook http://127.0.0.1:9/hook?*** failed: " in caplog.text
    assert "hook-s3cr3t" not in caplog.text


RELOAD_CFG = """
[vm.vm1]
schedule = "*-*-* 20:00"
disks = [{ lv = "system/xenvm", path = "vm1" }]
[vm."web-01"]
schedule = "*-*-* 21:00"
disks = [{ lv = "system/web" }]
[vm.quiet]
disks = [{ lv = "system/quiet" }]
[vm.mine]
disks = [{ lv = "system/mine" }]
"""


def unit(name: str, active: str = "inactive", enabled: str = "static") -> UnitFileState:
    return UnitFileState(name=name, load_state="loaded", active_state=active, unit_file_state=enabled)


def test_reload_starts_new_schedules_and_stops_lost_ones(write_config) -> None:
    from xenbackup.actions.reload import TimerAction, TimerChange, plan_timers

    cfg = config.load(str(write_config(RELOAD_CFG)))
    states = {u.name: u for u in [
        unit("xenbackup@vm1.timer", "active"),                  # scheduled and running: left alone
        unit("xenbackup@web\\x2d01.timer"),                      # a new schedule: started
        unit("xenbackup@quiet.timer", "active"),                # its schedule was removed: stopped
        unit("xenbackup@mine.timer", "active", "enabled"),      # enabled by the admin by hand: kept
        unit("xenbackup@gone.timer", "active", "enabled"),      # its VM left the config: stopped and disabled
        unit("xenbackup-prune.timer", "inactive", "enabled"),   # enabled without --now: started
        unit("xenbackup-verify.timer", "inactive", "disabled"),  # the admin turned it off: left alone
    ]}
    assert plan_timers(cfg, states) == [
        TimerAction("xenbackup@web\\x2d01.timer", TimerChange.START, "vm.web-01.schedule"),
        TimerAction("xenbackup@gone.timer", TimerChange.STOP_AND_DISABLE, f"no vm.gone in {cfg.path}"),
        TimerAction("xenbackup@quiet.timer", TimerChange.STOP, "vm.quiet has no schedule"),
        TimerAction("xenbackup-prune.timer", TimerChange.START, "enabled but not running"),
    ]
    assert plan_timers(cfg, {**states, **{a: unit(a, "active", "enabled") for a in
                                          ("xenbackup@web\\x2d01.timer", "xenbackup-prune.timer")},
                             "xenbackup@gone.timer": unit("xenbackup@gone.timer"),
                             "xenbackup@quiet.timer": unit("xenbackup@quiet.timer")}) == []


def test_reload_without_systemd_fails_with_one_line(write_config, monkeypatch, capsys) -> None:
    import pystemd.systemd1

    from xenbackup import cli

    class NoBus:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def load(self) -> None:
            raise ConnectionError("Connection refused by the system bus")

    monkeypatch.setattr(pystemd.systemd1, "Manager", NoBus)
    path = write_config(RELOAD_CFG)
    assert cli.main(["--config", str(path), "reload"]) == cli.EXIT_FAILED
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot reload systemd over D-Bus: Connection refused by the system bus"]


def test_generator_checks_every_schedule_with_one_systemd_analyze(write_config, tmp_path: Path) -> None:
    analyze = tmp_path / "systemd-analyze"
    calls = tmp_path / "analyze-calls"
    # Judges like systemd: one bad expression named on stderr, exit 1.
    analyze.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n'
                       'for a in "$@"; do [ "$a" = "never-ever" ] && '
                       '{ echo "Failed to parse calendar specification \'never-ever\': Invalid argument" >&2; '
                       'exit 1; }; done\nexit 0\n')
    analyze.chmod(0o755)
    vms = "".join(f'[vm.vm{i}]\nschedule = "*-*-* 0{i % 10}:00"\ndisks = [{{ lv = "system/lv{i}" }}]\n'
                  for i in range(100))
    cfg = config.load(str(write_config(f'[commands]\nsystemd-analyze = "{analyze}"\n' + vms +
                                       '[vm.bad]\nschedule = "never-ever"\ndisks = [{ lv = "system/bad" }]\n')))
    logged: list[str] = []
    enabled = generator.generate_checked(str(tmp_path / "out"), cfg, "/usr/lib/systemd/system/xenbackup@.timer",
                                         lambda level, text: logged.append(text))
    assert len(calls.read_text().splitlines()) == 1, "one spawn for all schedules"
    assert len(enabled) == 100 and "xenbackup@bad.timer" not in enabled
    assert any("vm.bad.schedule" in line and "never-ever" in line for line in logged)


# `systemctl show --all --timestamp=unix -p ... -- UNIT...` as systemd 252 prints it: one block per unit, in the
# bus's property order, a blank line between blocks; a unit that was never loaded is "not-found".
SHOW_UNITS = """Result=exit-code
ExecMainPID=4242
ExecMainStatus=1
Id=xenbackup@vm1.service
LoadState=loaded
ActiveState=failed
InactiveExitTimestamp=@1764470400
InactiveEnterTimestamp=@1764470460
InvocationID=6f1e3c5a9d8b4e2f8a7c6b5d4e3f2a1b

Result=success
ExecMainPID=0
ExecMainStatus=0
Id=xenbackup@web\\x2d01.service
LoadState=not-found
ActiveState=inactive
InactiveExitTimestamp=
InactiveEnterTimestamp=n/a
InvocationID=
"""
# systemd 252 prints a timer's times in its default style whatever --timestamp= says (TZ=UTC is set).
SHOW_TIMERS = """NextElapseUSecRealtime=Sun 2025-11-30 20:00:00 UTC
LastTriggerUSec=Sat 2025-11-29 20:00:00 UTC
Id=xenbackup@vm1.timer
"""


SHOW_BOTH = ("systemctl show --all --timestamp=unix -p Id,LoadState,ActiveState,Result,ExecMainStatus,ExecMainPID,"
             "InvocationID,InactiveExitTimestamp,InactiveEnterTimestamp,NextElapseUSecRealtime,LastTriggerUSec -- "
             "xenbackup@*.service xenbackup@*.timer")


def test_status_asks_systemd_about_every_unit_and_timer_in_one_systemctl_show(fake_bin) -> None:
    from xenbackup import systemd

    systemctl = fake_bin("systemctl", stdout=SHOW_UNITS + "\n" + SHOW_TIMERS)
    # The timers' times are in systemctl's default style, in its TZ: asked for in UTC, so that they parse.
    systemctl.write_text(systemctl.read_text().replace("\n", f'\necho "TZ=$TZ" >> {fake_bin.dir / "tz"}\n', 1))
    units, timers = systemd.overview(["xenbackup@vm1.service", "xenbackup@web\\x2d01.service",
                                      "xenbackup@vm2.service"], str(systemctl))
    assert fake_bin.calls.read_text().splitlines() == [SHOW_BOTH]
    assert (fake_bin.dir / "tz").read_text() == "TZ=UTC\n"
    assert units["xenbackup@vm1.service"] == UnitState(
        name="xenbackup@vm1.service", load_state="loaded", active_state="failed", result="exit-code",
        exec_main_status=1, invocation_id="6f1e3c5a9d8b4e2f8a7c6b5d4e3f2a1b",
        inactive_exit_usec=1764470400_000000, inactive_enter_usec=1764470460_000000)
    web = units["xenbackup@web\\x2d01.service"]
    assert web is not None and web.load_state == "not-found" and web.exec_main_status is None
    assert web.inactive_enter_usec == 0
    # Not shown: PID 1 does not hold it.
    assert units["xenbackup@vm2.service"] == systemd.not_loaded("xenbackup@vm2.service")
    assert timers == {"xenbackup@vm1.timer": TimerState("xenbackup@vm1.timer", 1764532800_000000,
                                                        1764446400_000000)}


def test_status_asks_pid_1_to_load_no_unit_it_does_not_hold(fake_bin) -> None:
    """`show` of a name would load each of 100 template instances; `show` of a pattern matches what PID 1
    holds. One that it does not hold is inactive, with no result."""
    from xenbackup import systemd

    systemctl = fake_bin("systemctl", stdout="")
    units, timers = systemd.overview([f"xenbackup@vm{i}.service" for i in range(100)], str(systemctl))
    assert fake_bin.calls.read_text().splitlines() == [SHOW_BOTH]
    assert units["xenbackup@vm7.service"] == systemd.not_loaded("xenbackup@vm7.service")
    assert (units["xenbackup@vm7.service"].active_state, units["xenbackup@vm7.service"].result) == (
        "inactive", "success")
    assert timers == {}


def test_status_falls_back_to_d_bus_when_systemctl_cannot_answer(fake_bin, monkeypatch) -> None:
    import pystemd.dbuslib

    from xenbackup import systemd

    opened: list[bool] = []

    class NoBus:
        def open(self) -> None:
            opened.append(True)
            raise ConnectionError("Connection refused by the system bus")

    monkeypatch.setattr(pystemd.dbuslib, "DBus", NoBus)
    systemctl = fake_bin("systemctl", code=1, stderr="System has not been booted with systemd as init system")
    # Neither path can answer: every unit is unknown, none is "dead".
    assert systemd.overview(["xenbackup@vm1.service"], str(systemctl)) == ({"xenbackup@vm1.service": None}, {})
    assert opened == [True, True]


def test_a_timespan_where_a_timestamp_belongs_is_not_taken_for_one() -> None:
    from xenbackup import systemd

    assert systemd._show_usec("@1764532800") == 1764532800_000000
    assert systemd._show_usec("Sun 2025-11-30 20:00:00 UTC") == 1764532800_000000
    assert systemd._show_usec("n/a") == systemd._show_usec("") == 0
    for value in ("1d 2h", "Sun 2025-11-30 21:00:00 CET", "Sun 2025-11-30"):
        with pytest.raises(ValueError):
            systemd._show_usec(value)


def test_the_restore_test_reads_a_segmented_image_with_one_restic_dump(write_config, tmp_path: Path,
                                                                       logging_restic) -> None:
    """verify's restore test of a thin LV's segmented image: every segment read back through restic (which
    checks each blob) and measured against what restic recorded, in one `restic dump` of their directory."""
    from xenbackup import names
    from xenbackup.actions.context import Context
    from xenbackup.actions.ops import restore_test

    wrapper, calls = logging_restic
    cfg = config.load(str(write_config(f"""
        [repository]
        url = "{tmp_path / 'repo'}"
        password_file = "{tmp_path / 'pw'}"
        host = "xen-a"
        [settings]
        state_dir = "{tmp_path / 'state'}"
        runtime_dir = "{tmp_path / 'run'}"
        [commands]
        restic = "{wrapper}"
        [vm.web]
        hypervisor = "none"
        disks = [{{ lv = "thinvg/web", mode = "block" }}]
    """)))
    ctx = Context.from_config(cfg)
    segdir = tmp_path / "mnt" / "thinvg-web"
    segdir.mkdir(parents=True)
    for index, size in enumerate((65_536, 65_536, 999)):
        (segdir / names.segment_file(index)).write_bytes(os.urandom(size))
    ctx.restic.ensure_initialized()
    ctx.restic.backup([str(segdir)], [*names.restic_tags("xen-a", "web", "thinvg/web", "block", "r1"),
                                      names.SEGMENTED_TAG], "xen-a", lambda p: None)
    calls.write_text("")
    result = restore_test(ctx, cfg.vm("web"), scratch_root=str(tmp_path))
    assert (result.entries, result.bytes) == (3, 2 * 65_536 + 999)
    dumps = [line for line in calls.read_text().splitlines() if " dump " in f" {line} "]
    assert len(dumps) == 1 and dumps[0].endswith(str(segdir)), dumps

