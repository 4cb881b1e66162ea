"""The Debian package as an admin meets it: what systemd, journald and dpkg make of it.

tests/vm/guest-run.sh has installed the .deb that the host built, with
`apt-get install ./xenbackup_*.deb` and no network, before these tests run.
The first test sets a VM's schedule and cuts the power; in the second boot
the file runs again from the top and that test checks what the generator and
the boot sweep did at boot. The purge test comes last and reinstalls the
package afterwards.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from vmlib.power import boot_id, cut_power, forget_notes, load_notes
from vmlib.product import CONFIG, MSG_FAILED, PASSWORD, REPO, Xb, sh, tree_hashes

UNITS = sorted(path.name for path in Path("units").iterdir() if path.suffix in (".service", ".timer"))
"""The unit files of the tree under test (the runner's cwd is the copied project tree)."""
GENERATOR = Path("/usr/lib/systemd/system-generators/xenbackup-generator")
CATALOG = Path("/usr/lib/systemd/catalog/xenbackup.catalog")
SCHEDULE = "Mon *-*-* 03:15:00"
SCHEDULED = f"""
[vm.vm1]
schedule = "{SCHEDULE}"
randomized_delay = "0"
hypervisor = "none"
snapshot_size = "16M"
disks = [{{ lv = "system/xenvm", path = "vm1" }}]
"""


def where(path: str) -> str:
    """The path with its directories resolved (/lib is /usr/lib here) but not a symlink at its end."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def packaged_files() -> set[str]:
    """Every non-directory path the package installed, as `where` names it."""
    listed = sh("dpkg-query", "-L", "xenbackup").stdout.split("\n")
    return {where(path) for path in listed if path and not os.path.isdir(path)}


def generated(relative: str) -> list[Path]:
    return sorted(Path("/run/systemd").glob(f"generator*/{relative}"))


def unix_time(unit: str, prop: str) -> float:
    value = sh("systemctl", "show", "--timestamp=unix", "-p", prop, "--value", unit).stdout.strip()
    assert value.startswith("@"), f"{unit} {prop}={value!r}"
    return float(value[1:])


def test_generator_and_boot_sweep_run_at_boot() -> None:
    notes = load_notes()
    if notes is None:
        # The package's own daemon-reload ran the generator before any config existed.
        assert not generated("timers.target.wants/xenbackup@vm1.timer")
        Xb().write_config(SCHEDULED)
        sh("sync")
        cut_power({"config": CONFIG.read_text()})
    try:
        assert notes["boot_id"] != boot_id(), "the machine did not reboot"
        assert GENERATOR.resolve() == Path("/usr/bin/xenbackup-generator")
        assert where(str(GENERATOR)) in packaged_files()
        (link,) = generated("timers.target.wants/xenbackup@vm1.timer")
        (dropin,) = generated("xenbackup@vm1.timer.d/*.conf")
        assert f"OnCalendar={SCHEDULE}\n" in dropin.read_text()
        # /run is a tmpfs: the link is from this boot, and older than the test runner, so from boot itself.
        assert link.lstat().st_mtime < unix_time("testbed-run.service", "ExecMainStartTimestamp")
        # timers.target pulled the generated timer in at boot: nobody started it.
        assert sh("systemctl", "is-active", "xenbackup@vm1.timer", check=False).stdout.strip() == "active"
        calendar = sh("systemctl", "show", "-p", "TimersCalendar", "--value", "xenbackup@vm1.timer").stdout
        assert f"OnCalendar={SCHEDULE} ;" in calendar, calendar
        sweep = sh("systemctl", "show", "-p", "Result", "-p", "ExecMainStatus", "-p", "ExecMainStartTimestampMonotonic",
                   "xenbackup-cleanup.service").stdout
        fields = dict(line.split("=", 1) for line in sweep.splitlines())
        assert fields["Result"] == "success" and fields["ExecMainStatus"] == "0", sweep
        assert int(fields["ExecMainStartTimestampMonotonic"]) > 0, "the enabled boot sweep did not run at boot"
    finally:
        forget_notes()
        sh("systemctl", "stop", "xenbackup@vm1.timer", check=False)
        CONFIG.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")


def test_installed_by_dpkg_not_by_install_sh() -> None:
    status = sh("dpkg-query", "-W", "-f", "${Status} ${Version}", "xenbackup").stdout
    assert re.fullmatch(r"install ok installed \S+", status), status
    assert sh("dpkg-query", "-S", "/usr/bin/xenbackup").stdout.startswith("xenbackup: ")
    assert sh("sh", "-c", "command -v xenbackup").stdout.strip() == "/usr/bin/xenbackup"
    assert not Path("/usr/local/bin/xenbackup").exists(), "packaging/install.sh ran too"
    assert "usage" in sh("xenbackup", "--help").stdout.lower()
    # The package's launcher finds xenbackup in Debian's dist-packages without the site module (every suite
    # runs it, and its steps import pystemd from there too).
    traced = sh("env", "PYTHONPROFILEIMPORTTIME=1", "xenbackup", "--help")
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines()
                if line.startswith("import time:")}
    assert "xenbackup.cli" in imported and "site" not in imported, sorted(imported)


def test_units_are_where_systemd_finds_them() -> None:
    ours = packaged_files()
    for unit in UNITS:
        shown = sh("systemctl", "cat", unit).stdout
        header, _, body = shown.partition("\n")
        path = header.removeprefix("# ")
        assert where(path) in ours, f"{unit}: systemd reads {path}, which the package did not install"
        assert body.rstrip("\n") == (Path("units") / unit).read_text().rstrip("\n"), unit
    for instance in ("xenbackup@vm1.service", "xenbackup@vm1.timer", "xenbackup-notify@vm1.service"):
        props = sh("systemctl", "show", "-p", "LoadState", "-p", "FragmentPath", instance).stdout
        fields = dict(line.split("=", 1) for line in props.splitlines())
        assert fields["LoadState"] == "loaded", (instance, props)
        assert where(fields["FragmentPath"]) in ours, (instance, props)


def test_boot_sweep_enabled_and_vm_timers_only_when_asked(xb: Xb) -> None:
    def enabled(unit: str) -> str:
        return sh("systemctl", "is-enabled", unit, check=False).stdout.strip()

    def active(unit: str) -> str:
        return sh("systemctl", "is-active", unit, check=False).stdout.strip()

    assert enabled("xenbackup-cleanup.service") == "enabled"
    for timer in ("xenbackup-prune.timer", "xenbackup-verify.timer"):
        assert (enabled(timer), active(timer)) == ("enabled", "active"), timer
    # No VM's timer is enabled, loaded or waiting until the admin or the config asks.
    wants = list(Path("/etc/systemd/system").glob("*.wants/xenbackup@*"))
    assert wants == [], wants
    assert generated("timers.target.wants/xenbackup@*") == []
    listed = sh("systemctl", "list-timers", "--all", "--no-legend", "--plain", "xenbackup@*").stdout
    assert listed.strip() == "", listed
    try:
        sh("systemctl", "enable", "--now", "xenbackup@vm2.timer")
        assert (enabled("xenbackup@vm2.timer"), active("xenbackup@vm2.timer")) == ("enabled", "active")
        sh("systemctl", "disable", "--now", "xenbackup@vm2.timer")
        assert (enabled("xenbackup@vm2.timer"), active("xenbackup@vm2.timer")) == ("disabled", "inactive")

        xb.write_config(SCHEDULED)
        sh("systemctl", "daemon-reload")
        assert len(generated("timers.target.wants/xenbackup@vm1.timer")) == 1
        wanted_by = sh("systemctl", "show", "-p", "WantedBy", "--value", "xenbackup@vm1.timer").stdout.split()
        assert "timers.target" in wanted_by, wanted_by
        CONFIG.unlink()
        sh("systemctl", "daemon-reload")
        assert generated("timers.target.wants/xenbackup@vm1.timer") == []
    finally:
        sh("systemctl", "disable", "--now", "xenbackup@vm2.timer", check=False)
        sh("systemctl", "stop", "xenbackup@vm1.timer", check=False)


def _catalog_entry(message_id: str) -> tuple[str, str]:
    """The Subject line and first body line of one catalog entry, as installed."""
    text = CATALOG.read_text()
    entry = text.split(f"-- {message_id}\n", 1)[1].split("\n-- ", 1)[0]
    subject = re.search(r"^Subject: (.*)$", entry, re.MULTILINE)
    assert subject, entry
    body = entry.split("\n\n", 1)[1].strip().splitlines()[0]
    return subject.group(1), body


def test_catalog_explains_our_events_in_journalctl_x() -> None:
    listed = sh("journalctl", "--list-catalog", "--no-pager").stdout
    ids = re.findall(r"^-- ([0-9a-f]{32})$", CATALOG.read_text(), re.MULTILINE)
    assert ids and all(message_id in listed for message_id in ids), listed
    # A name of its own finds the entry without a cursor: after the power cut journald starts a new file,
    # and a cursor taken in it did not find the entry (systemd 252).
    vm = f"vmcat{secrets.token_hex(4)}"
    entry = (f"MESSAGE_ID={MSG_FAILED}\nMESSAGE=Backup of {vm} failed\nXENBACKUP_VM={vm}\n"
             "XENBACKUP_RESULT=exit-code\nSYSLOG_IDENTIFIER=xenbackup-catalog-check\nPRIORITY=3\n")
    sh("logger", "--journald", input=entry)
    sh("journalctl", "--sync")
    shown = sh("journalctl", "-x", "-b", "--no-pager", f"XENBACKUP_VM={vm}").stdout
    subject, body = _catalog_entry(MSG_FAILED)
    expected_subject = subject.replace("@XENBACKUP_VM@", vm)
    expected_body = body.replace("@XENBACKUP_VM@", vm).replace("@XENBACKUP_RESULT@", "exit-code")
    assert f"Subject: {expected_subject}" in shown, shown
    assert expected_body in shown, shown


def test_purge_removes_the_program_but_not_repository_password_or_config(xb: Xb, tmp_path: Path) -> None:
    package = os.environ["XBTEST_PACKAGE"]
    example = Path("/etc/xenbackup/xenbackup.toml.example")
    try:
        xb.write_config(example.read_text() + "\n# edited by the admin\n")
        PASSWORD.write_text("correct horse battery staple\n")
        PASSWORD.chmod(0o600)
        data = tmp_path / "data"
        data.mkdir()
        (data / "file").write_bytes(os.urandom(4096))
        xb.restic("init")
        xb.restic("backup", "--tag", "kept-over-purge", str(data))
        repository = tree_hashes(REPO)
        config, password = CONFIG.read_bytes(), PASSWORD.read_bytes()
        installed = packaged_files()

        # Remove first: the program goes, the conffile (the example) stays until the purge.
        sh("apt-get", "remove", "--yes", "xenbackup", timeout=300)
        assert not Path("/usr/bin/xenbackup").exists()
        assert example.is_file()
        sh("dpkg", "--purge", "xenbackup", timeout=300)

        status = sh("dpkg-query", "-W", "-f", "${Status}", "xenbackup", check=False).stdout
        assert status in ("", "unknown ok not-installed", "purge ok not-installed"), status
        still_there = sorted(path for path in installed if os.path.lexists(path))
        assert still_there == [], still_there
        assert not example.exists(), "dpkg --purge leaves the package's conffile"
        etc = Path("/etc/systemd/system")
        links = [*etc.glob("*.wants/xenbackup*"), *etc.glob("xenbackup*")]
        assert links == [], f"enable or mask links left behind: {links}"
        assert sh("systemctl", "cat", "xenbackup@.service", check=False).returncode != 0

        assert CONFIG.read_bytes() == config
        assert PASSWORD.read_bytes() == password and stat.S_IMODE(PASSWORD.stat().st_mode) == 0o600
        assert tree_hashes(REPO) == repository
        snapshots = xb.snapshots("kept-over-purge")
        assert len(snapshots) == 1, snapshots
    finally:
        sh("apt-get", "install", "--yes", package, timeout=600)
    # Installing again neither replaces nor removes the admin's files.
    assert CONFIG.read_bytes() == config and PASSWORD.read_bytes() == password
    assert example.is_file() and Path("/usr/bin/xenbackup").exists()
