from __future__ import annotations

import pytest

from xenbackup import cli

CONFIG = """
[repository]
url = "{repo}"
password_file = "{pw}"

[settings]
runtime_dir = "{run}"
state_dir = "{state}"

[vm.vm1]
snapshot_size = "1G"
disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}, {{ lv = "system/vm1-swap", mode = "block" }}]
"""


@pytest.fixture
def cfg_path(write_config, tmp_path):
    return write_config(CONFIG.format(repo=tmp_path / "repo", pw=tmp_path / "pw", run=tmp_path / "run",
                                      state=tmp_path / "state"))


def test_plan_prints_every_command_and_runs_nothing(cfg_path, no_path_lvm, capsys) -> None:
    assert cli.main(["--config", str(cfg_path), "plan", "vm1"]) == 0
    out = capsys.readouterr().out
    assert not no_path_lvm.exists(), "plan must not execute anything"
    lines = out.splitlines()
    creates = [line for line in lines if "lvcreate --snapshot" in line]
    assert len(creates) == 2
    assert "--addtag xenbackup-vm:vm1" in creates[0] and f"--size {1 << 30}b" in creates[0]
    assert any(line.startswith("[mount] mount -t") and "ro," in line for line in lines)
    assert any("restic backup" in line and "--stdin --stdin-filename system-vm1-swap.img" in line for line in lines)
    assert sum(line.startswith("[cleanup] lvremove --yes ") for line in lines) == 2
    assert not any("layout:segments" in line for line in lines)
    # The run's one `lvs` before the window, as the snapshot step spawns it.
    reports = [line for line in lines if line.startswith("[snapshot] lvs ")]
    assert len(reports) == 1 and "vg_free" in reports[0] and "@" not in reports[0]


def test_plan_shows_the_segmented_backup_of_a_thin_origin_when_incrementals_are_on(
        write_config, tmp_path, no_path_lvm, capsys) -> None:
    text = CONFIG.format(repo=tmp_path / "repo", pw=tmp_path / "pw", run=tmp_path / "run", state=tmp_path / "state")
    path = write_config(text.replace("[settings]\n", "[settings]\nthin_incremental = true\n"))
    assert cli.main(["--config", str(path), "plan", "vm1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    segmented = [line for line in lines if "--tag layout:segments" in line]
    assert len(segmented) == 1 and "--parent" in segmented[0] and "--stdin" not in segmented[0]
    assert "xenbackup-base:vm1" in segmented[0]
    assert f"{tmp_path / 'run'}/vm1/" in segmented[0]


def test_plan_shows_a_block_only_vm_s_config_stored_before_the_snapshot(
        write_config, tmp_path, no_path_lvm, capsys) -> None:
    text = CONFIG.format(repo=tmp_path / "repo", pw=tmp_path / "pw", run=tmp_path / "run", state=tmp_path / "state")
    text = text.replace('{ lv = "system/xenvm", mode = "files", path = "vm1" }, ', "")
    text = text.replace('snapshot_size = "1G"\n', 'snapshot_size = "1G"\ndomain_config = "/etc/xen/vm1.cfg"\n')
    path = write_config(text)
    assert cli.main(["--config", str(path), "plan", "vm1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stores = [i for i, line in enumerate(lines) if "restic backup" in line and "--tag disk:config" in line]
    first_snapshot = next(i for i, line in enumerate(lines) if "lvcreate --snapshot" in line)
    assert len(stores) == 1 and stores[0] < first_snapshot and lines[stores[0]].startswith("[snapshot] ")
    assert "-- /etc/xen/vm1.cfg" in lines[stores[0]]


def test_config_error_exits_2_lists_all_and_touches_no_lvm(write_config, no_path_lvm, capsys) -> None:
    bad = write_config('[vm.vm1]\nsnapshot_size = "huge"\ndisks = [{ lv = "nope" }]\n')
    assert cli.main(["--config", str(bad), "step", "snapshot", "vm1"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: vm.vm1.snapshot_size:" in err and f"{bad}: vm.vm1.disks[0].lv:" in err
    assert not no_path_lvm.exists(), "a config error must never reach LVM"


def test_check_config_offline_checks_the_file_only(cfg_path, no_path_lvm, capsys) -> None:
    assert cli.main(["--config", str(cfg_path), "check-config", "--offline"]) == 0
    assert "OK (file only, host not checked), 1 VM(s): vm1" in capsys.readouterr().out
    assert not no_path_lvm.exists()


# lvs and vgs of a host with VG "system" holding only the LV "xenvm", answering as LVM does when a name is missing.
FAKE_LVS = """#!/usr/bin/env python3
import json, sys
want = sys.argv[-1]
if want != "system/xenvm":
    sys.stderr.write(f'  Failed to find logical volume "{want}"\\n' if want.startswith("system/")
                     else f'  Volume group "{want.split("/")[0]}" not found\\n')
    sys.exit(5)
print(json.dumps({"report": [{"lv": [{"lv_name": "xenvm", "vg_name": "system", "lv_attr": "-wi-ao----",
    "lv_size": "1073741824", "origin": "", "origin_size": "", "snap_percent": "", "data_percent": "",
    "metadata_percent": "", "lv_tags": "", "pool_lv": "", "lv_path": "/dev/system/xenvm"}]}]}))
"""
FAKE_VGS = """#!/usr/bin/env python3
import json, sys
if sys.argv[-1] != "system":
    sys.stderr.write(f'  Volume group "{sys.argv[-1]}" not found\\n  Cannot process volume group {sys.argv[-1]}\\n')
    sys.exit(5)
print(json.dumps({"report": [{"vg": [{"vg_name": "system", "vg_size": "4290772992", "vg_free": "2143289344",
    "vg_extent_size": "4194304"}]}]}))
"""


@pytest.fixture
def host_lvm(tmp_path):
    bindir = tmp_path / "hostbin"
    bindir.mkdir()
    for name, text in (("lvs", FAKE_LVS), ("vgs", FAKE_VGS)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return f'[commands]\nlvs = "{bindir / "lvs"}"\nvgs = "{bindir / "vgs"}"\n'


def test_check_config_on_the_host_passes_when_everything_exists(write_config, tmp_path, host_lvm, capsys) -> None:
    domain = tmp_path / "vm1.cfg"
    domain.write_text("name = 'vm1'\n")
    path = write_config(host_lvm + f'[vm.vm1]\ndomain_config = "{domain}"\ndisks = [{{ lv = "system/xenvm" }}]\n')
    assert cli.main(["--config", str(path), "check-config"]) == 0
    assert f"{path}: OK, 1 VM(s): vm1" in capsys.readouterr().out


def test_check_config_on_the_host_reports_missing_vg_lv_and_domain_config(write_config, tmp_path, host_lvm,
                                                                          capsys) -> None:
    domain = tmp_path / "vm1.cfg"
    domain.write_text("name = 'vm1'\n")
    path = write_config(host_lvm + f"""
        [vm.vm1]
        domain_config = "{domain}"
        disks = [{{ lv = "system/xenvm" }}, {{ lv = "system/vm1-data", mode = "block" }}]
        [vm.vm2]
        domain_config = "{tmp_path / "gone.cfg"}"
        disks = [{{ lv = "vg9/vm2" }}]
        """.replace("\n        ", "\n"))
    assert cli.main(["--config", str(path), "check-config"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {path}: vm.vm1.disks[1].lv: logical volume system/vm1-data does not exist on this host; "
        "a backup of vm1 would fail",
        f"error: {path}: vm.vm2.disks[0].lv: volume group vg9 does not exist on this host; "
        "a backup of vm2 would fail",
        f"error: {path}: vm.vm2.domain_config: {tmp_path / 'gone.cfg'} does not exist on this host; "
        "a backup of vm2 would not save it and a restore could not start the VM",
    ]
    assert cli.main(["--config", str(path), "check-config", "--offline"]) == 0


def test_unknown_vm_exits_2(cfg_path, no_path_lvm) -> None:
    assert cli.main(["--config", str(cfg_path), "step", "snapshot", "vm9"]) == 2
    assert not no_path_lvm.exists()


def test_escaped_instance_names_are_accepted(write_config, tmp_path, capsys) -> None:
    path = write_config(CONFIG.format(repo=tmp_path / "r", pw=tmp_path / "p", run=tmp_path / "run",
                                      state=tmp_path / "s").replace("[vm.vm1]", '[vm."web-01"]'))
    assert cli.main(["--config", str(path), "plan", "web\\x2d01"]) == 0
    assert "xenbackup-vm:web-01" in capsys.readouterr().out


def test_missing_lvm_tool_is_one_line_exit_1(write_config, tmp_path, capsys) -> None:
    path = write_config(CONFIG.format(repo=tmp_path / "r", pw=tmp_path / "p", run=tmp_path / "run",
                                      state=tmp_path / "s") + '\n[commands]\nlvs = "lvs-not-installed"\n')
    assert cli.main(["--config", str(path), "step", "snapshot", "vm1"]) == 1
    err = capsys.readouterr().err
    assert "lvs-not-installed not found" in err and "Traceback" not in err


def test_a_step_error_is_journalled_with_its_vm_and_phase(cfg_path, no_path_lvm, monkeypatch) -> None:
    import logging

    from xenbackup import journal

    fields: list[dict[str, str]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields.append(journal.journal_fields(record))

    setup = journal.setup
    monkeypatch.setattr(journal, "setup", lambda **kw: (setup(**kw), logging.getLogger().addHandler(Capture())))
    # The backup step without a snapshot step before it: the error escapes the step's phase and is logged
    # by the CLI, where journalctl -u and the alert's phase must still see it.
    assert cli.main(["--config", str(cfg_path), "step", "backup", "vm1"]) == 1
    (error,) = [f for f in fields if f["PRIORITY"] == "3"]
    assert error["XENBACKUP_VM"] == "vm1" and error["XENBACKUP_PHASE"] == "backup"
    assert error["OBJECT_SYSTEMD_UNIT"] == "xenbackup@vm1.service"


def test_a_run_whose_liveness_systemd_cannot_tell_is_left_alone(cfg_path, tmp_path, no_path_lvm, monkeypatch,
                                                                 capsys) -> None:
    import json

    import pystemd.systemd1

    class NoBus:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def load(self) -> None:
            raise ConnectionError("Connection refused by the system bus")

    monkeypatch.setattr(pystemd.systemd1, "Unit", NoBus)
    state = tmp_path / "run" / "vm1" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"vm": "vm1", "run_id": "20261129T100000-42", "started": 1.0,
                                 "owner": {"invocation_id": "0123abcd", "pid": 0, "unit": "xenbackup@vm1.service"}}))
    assert cli.main(["--config", str(cfg_path), "backup", "vm1"]) == cli.EXIT_BUSY
    assert not no_path_lvm.exists(), "a run that may be alive must keep its snapshots"
    assert ("cannot ask systemd whether xenbackup@vm1.service (invocation 0123abcd) is alive: "
            "cannot read xenbackup@vm1.service over D-Bus: Connection refused by the system bus; "
            "not touching its snapshots") in capsys.readouterr().err
    assert json.loads(state.read_text())["run_id"] == "20261129T100000-42"
    # Refused before anything started: no key check or repository (and its password) on the refused run's part.
    import threading
    assert not any(t.name == "xenbackup-background" for t in threading.enumerate())
    assert not (tmp_path / "pw").exists()


def test_check_config_reports_a_bad_schedule_with_the_other_errors(write_config, capsys) -> None:
    path = write_config('[vm.a]\nschedule = "bogus"\nsnapshot_size = "lots"\ndisks = [{ lv = "system/a" }]\n')
    assert cli.main(["--config", str(path), "check-config", "--offline"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "vm.a.snapshot_size: expected a size" in err and "vm.a.schedule: invalid calendar expression" in err


@pytest.mark.parametrize(("argv", "verb"), [
    (["step", "backup", "vm1"], "step"),
    (["--debug", "status", "--json"], "status"),
    (["--config", "status", "list"], "list"),          # the file is called "status"
    (["--conf", "backup", "status"], "status"),         # argparse takes a prefix of --config too
    (["--config=backup", "init"], "init"),
    (["--", "sweep"], "sweep"),
    (["--help"], None), ([], None), (["frobnicate"], None), (["--config", "x"], None),
    (["-h", "status"], None), (["--he", "status"], None), (["status", "-h"], "status"),
])
def test_the_verb_is_found_without_building_a_parser(argv: list[str], verb: str | None) -> None:
    assert cli.named_verb(argv) == verb


@pytest.mark.parametrize("argv", [
    ["step", "prepare", "web\\x2d01"], ["--config", "status", "list", "--json", "vm1"],
    ["--conf", "backup", "status", "--json"], ["--debug", "restore", "vm1", "--to", "/x", "--include", "a", "b"],
    ["verify", "--restore-test"], ["check-config", "--offline"], ["reload"],
])
def test_building_only_the_named_verb_parses_as_the_whole_parser_does(argv: list[str]) -> None:
    only = cli.build_parser(cli.named_verb(argv))
    subparsers = next(a for a in only._actions if a.dest == "verb")
    assert list(subparsers.choices) == [cli.named_verb(argv)]  # type: ignore[union-attr]
    assert only.parse_args(argv) == cli.build_parser().parse_args(argv)


def test_an_unknown_verb_is_told_against_every_verb(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["frobnicate"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err and "'status'" in err and "'step'" in err
