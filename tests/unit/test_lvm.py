from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenbackup.lvm import Lvm, LvmError, MalformedReport, parse_lvs, parse_overview, parse_vgs
from xenbackup.model import LvRef, SnapshotSize

CMDS = {n: n for n in ("lvs", "vgs", "lvcreate", "lvremove", "lvextend", "udevadm")}


def test_parse_recorded_classic_report(data) -> None:
    lvs = {lv.name: lv for lv in parse_lvs((data / "lvs-classic.json").read_text())}
    origin = lvs["xenvm"]
    assert origin.size == 1 << 30 and not origin.is_classic_snapshot and origin.is_active
    snap = lvs["xenvm.xb-vm1-20261126200000"]
    assert snap.is_classic_snapshot and not snap.is_invalid and snap.is_open
    assert snap.fill == pytest.approx(37.52)
    assert snap.origin == "xenvm" and snap.origin_size == 1 << 30
    assert snap.tags == ("xenbackup", "xenbackup-run:20261126T200000-812", "xenbackup-vm:vm1")
    overflowed = lvs["manual-snap"]
    assert overflowed.is_invalid and overflowed.fill == 100.0 and overflowed.tags == ()


def test_parse_recorded_thin_report(data) -> None:
    lvs = {lv.name: lv for lv in parse_lvs((data / "lvs-thin.json").read_text())}
    assert lvs["vm2"].is_thin and lvs["vm2"].pool == "pool"
    assert lvs["pool"].data_percent == 12.5 and lvs["pool"].metadata_percent == pytest.approx(10.94)
    assert lvs["vm2.xb-vm2-20261126200000"].is_thin and lvs["vm2.xb-vm2-20261126200000"].is_active


def test_parse_vgs(data) -> None:
    (vg,) = parse_vgs((data / "vgs.json").read_text())
    assert (vg.name, vg.free, vg.extent_size) == ("system", 2143289344, 4 << 20)


def test_one_lvs_overview_answers_for_lvs_and_vgs(data) -> None:
    """The recorded classic report, each row with its VG's fields as `-o ...,vg_size,vg_free,vg_extent_size`
    prints them."""
    report = json.loads((data / "lvs-classic.json").read_text())
    (vg,) = json.loads((data / "vgs.json").read_text())["report"][0]["vg"]
    for row in report["report"][0]["lv"]:
        row.update({k: vg[k] for k in ("vg_size", "vg_free", "vg_extent_size")})
    seen = parse_overview(json.dumps(report))
    assert seen.lv(LvRef("system", "xenvm")) is not None and seen.lv(LvRef("other", "xenvm")) is None
    assert [lv.name for lv in seen.tagged("xenbackup-vm:vm1")] == ["xenvm.xb-vm1-20261126200000"]
    assert (seen.vg("system").free, seen.vg("system").extent_size) == (2143289344, 4 << 20)
    with pytest.raises(LvmError, match="volume group gone not found"):
        seen.vg("gone")
    # Without the VG's fields it is not an overview.
    with pytest.raises(MalformedReport, match="vg_size"):
        parse_overview((data / "lvs-classic.json").read_text())


@pytest.mark.parametrize("text", ["", "not json", '{"report": 3}', '{"report": [{"lv": [1]}]}',
                                  '{"report": [{"lv": [{"lv_name": "x"}]}]}'])
def test_malformed_reports_name_the_command(text: str) -> None:
    with pytest.raises(MalformedReport, match=r"^lvs printed a report"):
        parse_lvs(text)


def test_classic_snapshot_argv_is_tagged() -> None:
    argv = Lvm(CMDS).create_snapshot_argv(LvRef("system", "xenvm"), "snap", SnapshotSize(1 << 30),
                                          ["xenbackup", "xenbackup-vm:vm1"])
    assert argv == ["lvcreate", "--snapshot", "--name", "snap", "--size", f"{1 << 30}b", "--monitor", "n",
                    "--addtag", "xenbackup", "--addtag", "xenbackup-vm:vm1", "system/xenvm"]


def test_dmeventd_monitors_classic_snapshots_only_when_the_host_asks_for_it() -> None:
    """Unmonitored by default: the overflow guard extends the snapshot itself. `dmeventd_monitoring = true`
    leaves LVM's own default (lvm.conf), and a thin snapshot, which the pool's monitoring covers, is
    never told either way."""
    origin, size = LvRef("system", "xenvm"), SnapshotSize(1 << 30)
    assert "--monitor" not in Lvm(CMDS, monitor=True).create_snapshot_argv(origin, "snap", size, [])
    assert "--monitor" not in Lvm(CMDS).create_snapshot_argv(LvRef("thin", "vm2"), "snap", None, [])


def test_thin_snapshot_argv_has_no_size_and_is_activated() -> None:
    argv = Lvm(CMDS).create_snapshot_argv(LvRef("thin", "vm2"), "snap", None, ["xenbackup"])
    assert "--size" not in argv and "--extents" not in argv
    assert argv[-3:] == ["--addtag", "xenbackup", "thin/vm2"]
    assert argv[4:6] == ["--setactivationskip", "n"]


def test_percent_sizes_and_extends() -> None:
    lvm = Lvm(CMDS)
    argv = lvm.create_snapshot_argv(LvRef("s", "o"), "n", SnapshotSize.parse("20%ORIGIN"), [])
    assert argv[4:6] == ["--extents", "20%ORIGIN"]
    assert lvm.extend_argv(LvRef("s", "n"), SnapshotSize.parse("10%ORIGIN")) == [
        "lvextend", "--extents", "+10%ORIGIN", "s/n"]
    assert lvm.extend_argv(LvRef("s", "n"), SnapshotSize.parse("256M")) == [
        "lvextend", "--size", f"+{256 << 20}b", "s/n"]


def test_remove_retries_in_use_then_succeeds(fake_bin, tmp_path) -> None:
    # A fake lvremove that fails "in use" twice, then succeeds: the retry loop must persist.
    counter = tmp_path / "n"
    counter.write_text("0")
    script = fake_bin.dir / "lvremove"
    script.write_text(f"""#!/bin/sh
n=$(cat {counter}); n=$((n+1)); echo $n > {counter}
if [ $n -lt 3 ]; then echo "  Logical volume system/snap contains a filesystem in use." >&2; exit 5; fi
exit 0
""")
    script.chmod(0o755)
    fake_bin("udevadm")
    sleeps: list[float] = []
    lvm = Lvm({**CMDS, "lvremove": str(script), "udevadm": str(fake_bin.dir / "udevadm")}, sleep=sleeps.append)
    assert lvm.remove(LvRef("system", "snap"), retries=5) is True
    assert counter.read_text().strip() == "3"
    assert sleeps == [0.5, 1.0]


def test_remove_of_missing_lv_is_not_an_error(fake_bin) -> None:
    script = fake_bin("lvremove", code=5, stderr='  Failed to find logical volume "system/snap"\n')
    assert Lvm({**CMDS, "lvremove": str(script)}).remove(LvRef("system", "snap")) is False


def test_remove_gives_up_with_stderr(fake_bin) -> None:
    script = fake_bin("lvremove", code=5, stderr="  Logical volume system/snap in use.\n")
    fake_bin("udevadm")
    lvm = Lvm({**CMDS, "lvremove": str(script), "udevadm": str(fake_bin.dir / "udevadm")}, sleep=lambda s: None)
    from xenbackup.run import CommandError
    with pytest.raises(CommandError, match=r"lvremove failed with exit code 5: Logical volume system/snap in use\."):
        lvm.remove(LvRef("system", "snap"), retries=2)


# `dmsetup status` lines of classic snapshots, as dm-snapshot prints them (start, length, target, counters).
DM_FRESH = "0 2097152 snapshot 16/2097152 16\n"
DM_HALF = "0 2097152 snapshot 1048592/2097152 2064\n"
DM_INVALID = "0 2097152 snapshot Invalid\n"
DM_OVERFLOW = "0 2097152 snapshot Overflow\n"


def test_snapshot_status_is_the_kernel_s_used_over_total() -> None:
    from xenbackup.lvm import parse_snapshot_status

    fresh = parse_snapshot_status(DM_FRESH)
    assert (fresh.used_sectors, fresh.total_sectors, fresh.invalid) == (16, 2097152, False)
    assert round(parse_snapshot_status(DM_HALF).fill, 3) == 50.001
    for line in (DM_INVALID, DM_OVERFLOW, "0 2097152 snapshot Merge failed\n"):
        status = parse_snapshot_status(line)
        assert status.invalid and status.fill == 100.0


def test_snapshot_status_of_something_else_is_a_malformed_report() -> None:
    from xenbackup.lvm import MalformedReport, parse_snapshot_status

    with pytest.raises(MalformedReport, match="dmsetup status"):
        parse_snapshot_status("0 2097152 linear\n")
    with pytest.raises(MalformedReport, match="bad snapshot counters"):
        parse_snapshot_status("0 2097152 snapshot x/y 16\n")


def test_dm_names_double_the_dashes_as_lvm_does() -> None:
    from xenbackup.lvm import dm_name

    assert dm_name(LvRef("system", "xenvm.xb-vm1-20261130")) == "system-xenvm.xb--vm1--20261130"
    assert dm_name(LvRef("vg-0", "web-01")) == "vg--0-web--01"


def test_links_that_are_there_already_are_not_waited_for(fake_bin, tmp_path: Path) -> None:
    udevadm = fake_bin("udevadm")
    lvm = Lvm({**CMDS, "udevadm": str(udevadm)})
    there, missing = tmp_path / "snap-a", tmp_path / "snap-b"
    there.write_text("")
    lvm.wait_for([str(there)])
    assert not fake_bin.calls.exists()
    lvm.wait_for([str(there), str(missing)])
    assert fake_bin.calls.read_text().splitlines() == [f"udevadm wait --timeout=10 {there} {missing}"]


def test_the_mount_step_waits_for_its_own_links_and_settles_only_without_udevadm_wait(fake_bin) -> None:
    udevadm = fake_bin("udevadm")
    lvm = Lvm({**CMDS, "udevadm": str(udevadm)})
    lvm.wait_for(["/dev/system/xenvm.xb-vm1-1"])
    assert fake_bin.calls.read_text().splitlines() == ["udevadm wait --timeout=10 /dev/system/xenvm.xb-vm1-1"]
    fake_bin.calls.unlink()
    # systemd before 251: "Unknown command verb wait."
    old = fake_bin("udevadm", code=1, stderr="Unknown command verb wait.")
    Lvm({**CMDS, "udevadm": str(old)}).wait_for(["/dev/system/a"])
    assert fake_bin.calls.read_text().splitlines() == ["udevadm wait --timeout=10 /dev/system/a",
                                                       "udevadm settle --timeout=10"]



TARGET_MISSING = ("  snapshot: Required device-mapper target(s) not detected in your kernel.\n"
                  "  Run `lvcreate --help' for more information.\n")


def test_lvcreate_waits_for_a_snapshot_target_still_loading(fake_bin, tmp_path) -> None:
    """Three units starting at once after a boot: LVM loads dm-snapshot for the first lvcreate, and the
    others see no target until the module is live (seen in the fleet suite)."""
    counter = tmp_path / "n"
    counter.write_text("0")
    (tmp_path / "missing").write_text(TARGET_MISSING)
    script = fake_bin.dir / "lvcreate"
    script.write_text(f"""#!/bin/sh
n=$(cat {counter}); n=$((n+1)); echo $n > {counter}
if [ $n -lt 3 ]; then cat {tmp_path / "missing"} >&2; exit 3; fi
exit 0
""")
    script.chmod(0o755)
    sleeps: list[float] = []
    lvm = Lvm({**CMDS, "lvcreate": str(script)}, sleep=sleeps.append)
    ref = lvm.create_snapshot(LvRef("system", "xenvm"), "snap", SnapshotSize.parse("256M"), ["xenbackup"])
    assert ref == LvRef("system", "snap") and counter.read_text().strip() == "3" and sleeps == [0.5, 1.0]


def test_lvcreate_gives_up_on_a_target_that_never_comes_and_retries_nothing_else(fake_bin) -> None:
    from xenbackup.run import CommandError

    sleeps: list[float] = []
    never = fake_bin("lvcreate", code=3, stderr=TARGET_MISSING)
    with pytest.raises(CommandError, match=r"Required device-mapper target"):
        Lvm({**CMDS, "lvcreate": str(never)}, sleep=sleeps.append).create_snapshot(
            LvRef("system", "xenvm"), "snap", SnapshotSize.parse("256M"), [])
    assert sleeps == [0.5, 1.0, 2.0]
    sleeps.clear()
    full = fake_bin("lvcreate", code=5, stderr='  Volume group "system" has insufficient free space.\n')
    with pytest.raises(CommandError, match="insufficient free space"):
        Lvm({**CMDS, "lvcreate": str(full)}, sleep=sleeps.append).create_snapshot(
            LvRef("system", "xenvm"), "snap", SnapshotSize.parse("256M"), [])
    assert sleeps == []
