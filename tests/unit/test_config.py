from __future__ import annotations

import shutil

import pytest

from xenbackup import config
from xenbackup.config import ConfigError
from xenbackup.model import Consistency, DiskMode, HypervisorKind, LvRef, SizeKind, SnapshotSize

GOOD = """
[repository]
url = "/srv/restic"

[defaults]
snapshot_size = "2G"
keep_daily = 7

[vm.vm1]
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]

[vm."web-01"]
hypervisor = "kvm"
snapshot_size = "20%ORIGIN"
keep_daily = 3
disks = [{ lv = "/dev/system/web01", mode = "block" }]
"""


def test_valid_config_builds_frozen_vms(write_config) -> None:
    cfg = config.load(str(write_config(GOOD)))
    vm1 = cfg.vm("vm1")
    assert vm1.disks[0].lv == LvRef("system", "xenvm")
    assert vm1.disks[0].mode is DiskMode.FILES and vm1.disks[0].path == "vm1"
    assert vm1.snapshot_size == SnapshotSize(2 << 30)
    assert vm1.domain_config == "/etc/xen/vm1.cfg"
    assert vm1.retention.keep_daily == 7
    web = cfg.vm("web-01")
    assert web.hypervisor is HypervisorKind.KVM and web.domain_config is None
    assert web.snapshot_size == SnapshotSize(20, SizeKind.ORIGIN)
    assert web.retention.keep_daily == 3
    assert cfg.repository.url == "/srv/restic" and cfg.repository.is_local
    with pytest.raises(AttributeError):
        vm1.name = "x"  # type: ignore[misc]


def test_every_error_is_reported_at_once_with_file_and_key(write_config) -> None:
    path = write_config("""
        [repository]
        urll = "/x"
        compression = "fast"

        [defaults]
        snapshot_size = "ten gigs"

        [vm.vm1]
        hypervisor = "vmware"
        disks = [{ lv = "xenvm", mode = "tape", path = "../etc" }, { mode = "files" }]

        [vm.vm2]
        disks = []

        [bogus]
    """)
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    errors = exc.value.errors
    expected_keys = [
        "repository.urll", "repository.compression", "defaults.snapshot_size", "vm.vm1.hypervisor",
        "vm.vm1.disks[0].lv", "vm.vm1.disks[0].mode", "vm.vm1.disks[1].lv", "vm.vm2.disks", "bogus",
    ]
    for key in expected_keys:
        assert any(e.startswith(f"{path}: {key}: ") for e in errors), (key, errors)
    assert any("expected a size like" in e for e in errors)


def test_syntax_error_names_file(write_config) -> None:
    path = write_config("[vm.vm1\n")
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    assert exc.value.errors[0].startswith(f"{path}: (syntax): ")


def test_missing_file_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(str(tmp_path / "nope.toml"))
    assert exc.value.errors == [f"{tmp_path / 'nope.toml'}: cannot read: No such file or directory"]


def test_same_lv_in_two_vms_is_rejected(write_config) -> None:
    path = write_config("""
        [vm.a]
        disks = [{ lv = "system/xenvm" }]
        [vm.b]
        disks = [{ lv = "system/xenvm" }]
    """)
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    assert exc.value.errors == [f"{path}: vm.b.disks[0].lv: system/xenvm already belongs to vm.a"]


def test_path_escaping_filesystem_is_rejected(write_config) -> None:
    path = write_config("""
        [vm.a]
        disks = [{ lv = "system/xenvm", path = "vm1/../../x" }]
    """)
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    assert "vm.a.disks[0].path: must be a relative path" in exc.value.errors[0]


@pytest.mark.parametrize("name", ["web 01", "a/b", "-x", ""])
def test_bad_vm_names_are_rejected(write_config, name: str) -> None:
    path = write_config(f'[vm."{name}"]\ndisks = [{{ lv = "system/xenvm" }}]\n')
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    assert f"vm.{name}: VM names are" in exc.value.errors[0]


def test_unknown_vm_lists_configured(write_config) -> None:
    cfg = config.load(str(write_config(GOOD)))
    with pytest.raises(ConfigError) as exc:
        cfg.vm("vm9")
    assert "vm.vm9: no such VM in the config (configured: vm1, web-01)" in exc.value.errors[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("1G", SnapshotSize(1 << 30)),
    ("512M", SnapshotSize(512 << 20)),
    ("1.5g", SnapshotSize(int(1.5 * (1 << 30)))),
    ("20%ORIGIN", SnapshotSize(20, SizeKind.ORIGIN)),
    ("50%free", SnapshotSize(50, SizeKind.FREE)),
])
def test_snapshot_sizes(text: str, expected: SnapshotSize) -> None:
    assert SnapshotSize.parse(text) == expected


@pytest.mark.parametrize("text", ["0", "-1G", "20%", "150%ORIGIN", "0%VG", "1X", ""])
def test_bad_snapshot_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        SnapshotSize.parse(text)


def test_env_var_selects_config(write_config, monkeypatch) -> None:
    path = write_config(GOOD)
    monkeypatch.setenv("XENBACKUP_CONFIG", str(path))
    assert config.load().path == str(path)


def test_the_readme_example_config_is_valid(tmp_path) -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S)
    assert block, "README.md has no toml example"
    path = tmp_path / "readme.toml"
    path.write_text(block.group(1))
    cfg = config.load(str(path))
    assert cfg.vms and all(vm.pool_threshold == 95 for vm in cfg.vms.values())
    assert cfg.vm("db1").discovers_disks, "the README's two-disk VM example is not just [vm.db1]"


def test_a_vm_without_disks_discovers_them_with_its_consistency_settings(write_config) -> None:
    cfg = config.load(str(write_config("""
[defaults]
max_pause = 20

[vm.db1]

[vm.kvm1]
hypervisor = "kvm"
consistency = "freeze"
max_pause = 5
exclude = ["vdb"]
""")))
    db1, kvm1 = cfg.vm("db1"), cfg.vm("kvm1")
    assert db1.discovers_disks and db1.disks == ()
    assert db1.consistency is Consistency.AUTO and db1.max_pause == 20 and db1.domain_config == "/etc/xen/db1.cfg"
    assert kvm1.consistency is Consistency.FREEZE and kvm1.max_pause == 5 and kvm1.exclude == ("vdb",)


def test_consistency_and_discovery_mistakes_are_reported_together(write_config) -> None:
    path = write_config("""
[vm.plain]
hypervisor = "none"
consistency = "pause"

[vm.xen1]
consistency = "freeze"

[vm.slow]
max_pause = 0

[vm.listed]
exclude = ["xvdb"]
disks = [{ lv = "system/listed" }]

[vm.bad]
consistency = "sometimes"
exclude = "xvdb"
""")
    with pytest.raises(ConfigError) as err:
        config.load(str(path))
    keys = [e.split(": ")[1] for e in err.value.errors]
    assert keys == ["vm.slow.max_pause", "vm.bad.consistency", "vm.bad.exclude", "vm.plain.disks",
                    "vm.plain.consistency", "vm.xen1.consistency", "vm.listed.exclude"]
    assert all(e.startswith(f"{path}: ") for e in err.value.errors)


def test_a_duplicate_disk_is_reported_at_its_own_index(write_config) -> None:
    path = write_config("""
        [vm.a]
        disks = [{ lv = "system/a" }, { mode = "files" }, { lv = "system/a" }]
    """)
    with pytest.raises(ConfigError) as exc:
        config.load(str(path))
    assert f"{path}: vm.a.disks[2].lv: system/a is listed twice" in exc.value.errors
    assert not any("disks[1].lv: system/a" in e for e in exc.value.errors)


SCHEDULES = """
    [defaults]
    randomized_delay = "5 parsecs"
    [vm.a]
    schedule = "*-*-* 20:00"
    snapshot_size = "lots"
    disks = [{ lv = "system/a" }]
    [vm.b]
    schedule = "bogus o'clock"
    randomized_delay = "10min"
    disks = [{ lv = "system/b" }]
    [vm.c]
    schedule = "*-*-* 25:00"
    disks = [{ lv = "system/c" }]
"""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_calendar_and_timespan_errors_come_with_every_other_error(write_config) -> None:
    path = write_config(SCHEDULES)
    with pytest.raises(ConfigError) as exc:
        config.load(str(path), ask_systemd=True)
    assert exc.value.errors == [
        f"{path}: vm.a.snapshot_size: expected a size like \"10G\" or \"20%ORIGIN\", got 'lots'",
        f"{path}: vm.b.schedule: invalid calendar expression \"bogus o'clock\": "
        "Failed to parse calendar specification 'bogus o'clock': Invalid argument",
        f"{path}: vm.c.schedule: invalid calendar expression '*-*-* 25:00': "
        "Failed to parse calendar specification '*-*-* 25:00': Invalid argument",
        f"{path}: defaults.randomized_delay: invalid time span '5 parsecs': "
        "Failed to parse time span '5 parsecs': Invalid argument",
    ]


def test_every_calendar_expression_is_judged_by_one_systemd_analyze(write_config, fake_bin) -> None:
    analyze = fake_bin("systemd-analyze", code=1,
                       stderr="Failed to parse calendar specification 'bogus o'clock': Invalid argument\n")
    path = write_config(f'[commands]\n"systemd-analyze" = "{analyze}"\n' + SCHEDULES.replace("5 parsecs", "5min"))
    with pytest.raises(ConfigError) as exc:
        config.load(str(path), ask_systemd=True)
    calls = fake_bin.calls.read_text().splitlines()
    assert calls[0] == "systemd-analyze calendar *-*-* 20:00 bogus o'clock *-*-* 25:00"
    assert [c.split()[1] for c in calls].count("calendar") == 1
    assert sum("schedule: invalid calendar" in e for e in exc.value.errors) == 1


def test_without_systemd_analyze_the_schedules_are_reported_unchecked(write_config, tmp_path) -> None:
    path = write_config(f'[commands]\n"systemd-analyze" = "{tmp_path / "nope"}"\n[vm.a]\nschedule = "daily"\n'
                        'disks = [{ lv = "system/a" }]\n')
    with pytest.raises(ConfigError) as exc:
        config.load(str(path), ask_systemd=True)
    assert exc.value.errors == [f"{path}: commands.systemd-analyze: cannot check the calendar expressions: "
                                "nope not found"]
    assert config.load(str(path)).vm("a").schedule == "daily"
