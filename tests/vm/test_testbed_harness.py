"""Fast checks of the test bed harness itself (no guest is booted)."""

from __future__ import annotations

import subprocess
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from xbtestbed.config import REPO_ROOT, Flavour, InfraError, Install, Settings, parse_flavours
from xbtestbed.guestrun import GuestRequest, GuestRun, _set_aside
from xbtestbed.image import Image, deb822_to_one_line, describe_build_failure, image_key, one_line_entries
from xbtestbed.junit import Outcome, parse_junit, results_for
from xbtestbed.pytest_support import FlavourResults, boot_order, hung_task_report
from xbtestbed.qemu import BLANK_DISK_SERIALS, Machine
from xbtestbed.suites import SUITES, GuestCase, guest_cases, pytest_arguments, scan_file


def test_suites_booting_at_once_never_parse_their_files_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent ast.parse can raise SystemError on CPython 3.11 (gh-106905): the scans must take turns."""
    import ast
    import threading
    import time

    from xbtestbed import suites

    real_parse, inside, most = ast.parse, [0], [0]
    guard = threading.Lock()

    def slow_parse(*args: object, **kwargs: object) -> ast.Module:
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.002)  # wide enough for another thread to enter if nothing stops it
        try:
            return real_parse(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(suites.ast, "parse", slow_parse)
    threads = [threading.Thread(target=guest_cases, args=(SUITES[name],)) for name in ("host", "faults", "fleet")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_scan_finds_functions_and_class_methods_but_not_helpers(tmp_path: Path) -> None:
    source = tmp_path / "test_x.py"
    source.write_text(
        textwrap.dedent(
            """
            import pytest
            def helper(): pass
            def test_one(): pass
            @pytest.mark.parametrize("fs", ["ext4", "xfs"])
            def test_two(fs): pass
            class TestGroup:
                def test_three(self): pass
                def setup_method(self): pass
            class Helper:
                def test_not_collected(self): pass
            """
        )
    )
    assert scan_file(source, "sub/test_x.py") == [
        GuestCase("sub/test_x.py", "test_one"),
        GuestCase("sub/test_x.py", "test_two"),
        GuestCase("sub/test_x.py", "test_three", "TestGroup"),
    ]


def test_suites_split_the_guest_directory() -> None:
    host = {case.path for case in guest_cases(SUITES["host"])}
    xen = {case.path for case in guest_cases(SUITES["xen"])}
    powercut = {case.path for case in guest_cases(SUITES["powercut"])}
    kvm = {case.path for case in guest_cases(SUITES["kvm"])}
    assert "test_smoke_lvm.py" in host and "test_smoke_systemd.py" in host
    assert xen and all(path.startswith("xen/") for path in xen)
    assert powercut and all(path.startswith("powercut/") for path in powercut)
    assert kvm and all(path.startswith("kvm/") for path in kvm)
    assert not any(path.startswith(("xen/", "powercut/", "kvm/")) for path in host)
    assert SUITES["powercut"].flavour is Flavour.HOST and SUITES["kvm"].flavour is Flavour.HOST


def test_whole_suite_runs_the_directory_and_a_subset_runs_node_ids() -> None:
    host, xen = SUITES["host"], SUITES["xen"]
    assert pytest_arguments(host, None) == [
        "tests/vm/guest",
        "--ignore=tests/vm/guest/xen",
        "--ignore=tests/vm/guest/powercut",
        "--ignore=tests/vm/guest/kvm",
        "--ignore=tests/vm/guest/package",
        "--ignore=tests/vm/guest/fleet",
        "--ignore=tests/vm/guest/faults",
    ]
    assert pytest_arguments(xen, guest_cases(xen)) == ["tests/vm/guest/xen"]
    case = guest_cases(host)[0]
    assert pytest_arguments(host, [case]) == [f"tests/vm/guest/{case.node_id}"]


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="test_smoke_lvm" name="test_plain" time="1.0"/>
<testcase classname="test_smoke_lvm" name="test_fs[ext4]" time="1.0"/>
<testcase classname="test_smoke_lvm" name="test_fs[xfs]" time="1.0">
  <failure message="AssertionError: hashes differ">trace text</failure></testcase>
<testcase classname="test_smoke_lvm" name="test_fs_other" time="1.0"/>
<testcase classname="xen.test_smoke_xen" name="test_domu" time="1.0">
  <skipped type="pytest.skip" message="no dom0">skip text</skipped></testcase>
<testcase classname="tests.vm.guest.test_smoke_lvm.TestGroup" name="test_method" time="1.0"/>
<testcase classname="" name="xen.test_broken" time="0.0">
  <error message="collection failure">ImportError: cannot import name 'Gone'</error></testcase>
</testsuite></testsuites>
"""


def test_junit_matches_by_name_or_parametrized_prefix(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    results = parse_junit(junit)

    fs = results_for(GuestCase("test_smoke_lvm.py", "test_fs"), results)
    assert [(r.name, r.outcome) for r in fs] == [("test_fs[ext4]", Outcome.PASSED), ("test_fs[xfs]", Outcome.FAILED)]
    assert fs[1].message == "AssertionError: hashes differ" and fs[1].details == "trace text"
    skipped = results_for(GuestCase("xen/test_smoke_xen.py", "test_domu"), results)
    assert [r.outcome for r in skipped] == [Outcome.SKIPPED]
    method = results_for(GuestCase("test_smoke_lvm.py", "test_method", "TestGroup"), results)
    assert [r.name for r in method] == ["test_method"]
    assert results_for(GuestCase("test_smoke_lvm.py", "test_missing"), results) == []
    broken = results_for(GuestCase("xen/test_broken.py", "test_anything"), results)
    assert [(r.outcome, r.message) for r in broken] == [(Outcome.FAILED, "collection failure")]


def _results(tmp_path: Path, junit_text: str | None, error: str | None = None) -> FlavourResults:
    request = GuestRequest.pytest(Flavour.HOST, ["tests/vm/guest"])
    run = GuestRun(request, tmp_path, error=error, exit_code=1)
    (tmp_path / "pytest.log").write_text("line 1\nE   the guest's last words\n")
    if junit_text is not None:
        (tmp_path / "junit.xml").write_text(junit_text)
    return FlavourResults.from_run(run)


def test_host_verdicts_never_pass_a_guest_failure_skip_or_absence(tmp_path: Path) -> None:
    results = _results(tmp_path, JUNIT)
    results.check(GuestCase("test_smoke_lvm.py", "test_plain"))  # passes

    with pytest.raises(pytest.fail.Exception, match=r"(?s)failed in the guest.*hashes differ.*last words"):
        results.check(GuestCase("test_smoke_lvm.py", "test_fs"))
    with pytest.raises(pytest.skip.Exception, match=r"skipped in the guest: test_domu: no dom0"):
        results.check(GuestCase("xen/test_smoke_xen.py", "test_domu"))
    with pytest.raises(pytest.fail.Exception, match=r"missing from junit\.xml"):
        results.check(GuestCase("test_smoke_lvm.py", "test_missing"))


def test_host_verdict_names_a_test_bed_error_or_a_missing_junit(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    broken = _results(tmp_path / "a", None, error="guest never came up")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)test bed error: guest never came up.*last words"):
        broken.check(GuestCase("test_smoke_lvm.py", "test_plain"))
    silent = _results(tmp_path / "b", None)
    with pytest.raises(pytest.fail.Exception, match=r"wrote no junit\.xml"):
        silent.check(GuestCase("test_smoke_lvm.py", "test_plain"))


def test_a_guest_that_hung_in_the_kernel_is_reported_with_the_stacks(tmp_path: Path) -> None:
    hung = _results(tmp_path, None, error="guest overran the overall limit of 3300s")
    (tmp_path / "dmesg.txt").write_text(
        "[ 10.0] loop0: detected capacity change\n"
        "[ 1571.2] INFO: task xenbackup:6918 blocked for more than 120 seconds.\n"
        "[ 1571.2] task:xenbackup state:D stack:0 pid:6918\n"
        "[ 1571.2]  io_schedule+0x42/0x70\n")
    wanted = r"(?s)overran.*last words.*hung-task report.*xenbackup:6918 blocked.*io_schedule"
    with pytest.raises(pytest.fail.Exception, match=wanted) as raised:
        hung.check(GuestCase("test_smoke_lvm.py", "test_plain"))
    assert "capacity change" not in str(raised.value)
    assert hung_task_report("[ 1.0] all is well\n") == ""


def test_request_env_is_bash_that_round_trips_arguments(tmp_path: Path) -> None:
    request = GuestRequest.pytest(Flavour.XEN, ["tests/vm/guest/x.py::test_a[it's ok]", "-k", "a and b"])
    env = tmp_path / "request.env"
    env.write_text(request.env_text(600, "xenbackup_0.1.0-1_all.deb"))
    printed = subprocess.run(
        ["bash", "-c", f'. {env} && printf "%s\\n" "$XBTEST_FLAVOUR" "$XBTEST_STEP_TIMEOUT" "$XBTEST_INSTALL"'
         ' "$XBTEST_DEB" "${XBTEST_ARGS[@]}"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert printed == ["xen", "600", "deb", "xenbackup_0.1.0-1_all.deb", "tests/vm/guest/x.py::test_a[it's ok]", "-k",
                       "a and b"]


def test_one_suite_keeps_install_sh_proven_and_the_others_install_the_deb() -> None:
    assert {name: suite.install for name, suite in SUITES.items()} == {
        "host": Install.DEB, "xen": Install.DEB, "kvm": Install.DEB, "package": Install.DEB, "powercut": Install.SCRIPT,
        "fleet": Install.DEB, "faults": Install.DEB}
    request = GuestRequest.pytest(Flavour.HOST, ["tests/vm/guest/powercut"], "powercut", Install.SCRIPT)
    assert "XBTEST_INSTALL=script\n" in request.env_text(600)


def test_apt_sources_keep_only_debian_bookworm_entries() -> None:
    deb822 = textwrap.dedent(
        """\
        Types: deb
        URIs: http://mirror.example/debian
        Suites: bookworm bookworm-updates
        Components: main
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

        Types: deb
        URIs: https://vendor.example/apt
        Suites: nodistro
        Components: main
        """
    )
    assert deb822_to_one_line(deb822) == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian bookworm main",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian"
        " bookworm-updates main",
    ]
    one_line = "deb [arch=amd64] http://m.example/debian bookworm main\ndeb http://x.example/ stable main\n"
    assert one_line_entries(one_line) == ["deb [arch=amd64] http://m.example/debian bookworm main"]


def test_build_failure_names_an_unreachable_registry() -> None:
    output = "I: running apt-get update...\nErr:1 http://m.example bookworm InRelease\n"
    output += "  Temporary failure resolving 'm.example'\nE: apt-get update failed\n"
    message = describe_build_failure(output, 1, Path("build.log"))
    assert message.startswith("mmdebstrap cannot reach the Debian package registry: Temporary failure resolving")


def test_image_key_changes_with_the_package_list(tmp_path: Path) -> None:
    (tmp_path / "packages.txt").write_text("systemd\n")
    (tmp_path / "build.sh").write_text("#!/bin/sh\n")
    first = image_key(tmp_path)
    (tmp_path / "packages.txt").write_text("systemd\nlvm2\n")
    assert image_key(tmp_path) != first
    assert image_key() == image_key(REPO_ROOT / "tests" / "vm" / "image")


def test_flavour_selection_rejects_unknown_names() -> None:
    assert parse_flavours("") == frozenset(Flavour)
    assert parse_flavours(" xen ") == {Flavour.XEN}
    with pytest.raises(InfraError, match="unknown flavour"):
        parse_flavours("host,kvm")


def test_qemu_command_lines_follow_the_measured_recipes(tmp_path: Path) -> None:
    image = Image(tmp_path / "key", "key")
    disks = [tmp_path / f"{serial}.raw" for serial in BLANK_DISK_SERIALS]
    common = dict(
        image=image,
        overlay=tmp_path / "o.qcow2",
        blank_disks=disks,
        source_share=tmp_path,
        results_share=tmp_path / "r",
        guest_timeout=600,
    )
    xen = " ".join(Machine(flavour=Flavour.XEN, **common).command())  # type: ignore[arg-type]
    host = " ".join(Machine(flavour=Flavour.HOST, **common).command())  # type: ignore[arg-type]
    assert "-cpu max,-smap,-smep,-xsave" in xen and "bootscrub=false" in xen and "console=hvc0" in xen
    assert "-enable-kvm" not in xen + host and "tcg" in host
    assert all(f"serial={serial}" in host for serial in BLANK_DISK_SERIALS)
    assert "readonly=on" in host and "mount_tag=results" in host
    assert "-cpu max,-xsave,-avx,-avx2 -m 2048" in host


def test_the_fleet_suite_boots_a_cpu_and_memory_that_ceph_runs_on(tmp_path: Path) -> None:
    suite = SUITES["fleet"]
    request = GuestRequest.pytest(suite.flavour, ["x"], suite.name, suite.install, suite.cpu, suite.memory_mib)
    disks = [tmp_path / f"{serial}.raw" for serial in BLANK_DISK_SERIALS]
    machine = Machine(flavour=request.flavour, image=Image(tmp_path / "key", "key"), overlay=tmp_path / "o.qcow2",
                      blank_disks=disks, source_share=tmp_path, results_share=tmp_path / "r", guest_timeout=600,
                      cpu=request.cpu, memory_mib=request.memory_mib)
    argv = " ".join(machine.command())
    assert "-cpu max,-xsave,-avx,-avx2" in argv and "-m 3072" in argv
    assert "fleet" in SUITES["host"].excluded


def test_a_power_cut_sets_the_boot_logs_aside_and_empties_the_results_share(tmp_path: Path) -> None:
    artifacts, results = tmp_path / "artifacts", tmp_path / "results"
    (artifacts / "boot1").mkdir(parents=True)
    results.mkdir()
    for name in ("console.log", "qemu-command.txt", "reboot-request", "pytest.log"):
        (artifacts / name).write_text(name)
    (results / "request.env").write_text("XBTEST_MODE=pytest\n")
    (results / "reboot-request").write_text("power cut\n")
    (results / "junk").mkdir()

    _set_aside(artifacts, results, artifacts / "boot2")

    assert sorted(p.name for p in (artifacts / "boot2").iterdir()) == ["console.log", "pytest.log", "reboot-request"]
    assert sorted(p.name for p in artifacts.iterdir()) == ["boot1", "boot2", "qemu-command.txt"]
    assert list(results.iterdir()) == []


def test_every_suite_is_in_the_default_run_and_extra_ones_can_be_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [name for name, suite in SUITES.items() if not suite.in_default_run] == []
    monkeypatch.delenv("XENBACKUP_TESTVM_EXTRA", raising=False)
    assert Settings.from_environment().extra_suites == frozenset()
    monkeypatch.setenv("XENBACKUP_TESTVM_EXTRA", " fleet, ")
    assert Settings.from_environment().extra_suites == {"fleet"}


def test_two_guests_share_two_cores_one_vcpu_each_and_one_boot_by_hand_gets_both(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XENBACKUP_TESTVM_PARALLEL", raising=False)
    settings = Settings.from_environment()
    assert settings.parallel == min(2, settings.cores)
    two = replace(settings, cores=2, parallel=2)
    assert two.vcpus() == 1
    assert replace(two, parallel=1).vcpus() == 2
    assert replace(two, cores=16).vcpus() == 2 and replace(two, cores=1, parallel=1).vcpus() == 1
    disks = [tmp_path / f"{serial}.raw" for serial in BLANK_DISK_SERIALS]
    for flavour in Flavour:
        machine = Machine(flavour=flavour, image=Image(tmp_path / "key", "key"), overlay=tmp_path / "o.qcow2",
                          blank_disks=disks, source_share=tmp_path, results_share=tmp_path / "r", guest_timeout=600,
                          vcpus=two.vcpus())
        argv = " ".join(machine.command())
        assert "-smp 1 " in argv
        assert ("dom0_max_vcpus=1 " in argv) == (flavour is Flavour.XEN)
    # The order that keeps two lanes even: the longest suites first.
    assert boot_order(list(SUITES))[:3] == ["host", "faults", "fleet"]
    assert sorted(boot_order(list(SUITES))) == sorted(SUITES)


def test_the_image_and_package_are_made_ready_while_the_host_tests_before_the_suites_run(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import threading
    from types import SimpleNamespace

    from xbtestbed import pytest_support

    monkeypatch.setenv("XENBACKUP_TESTVM_ARTIFACTS", str(tmp_path / "artifacts"))
    made: list[str] = []
    release = threading.Event()

    def fake_image(settings: Settings, build_log: Path, report: object) -> None:
        assert release.wait(10)
        made.append(f"image {build_log.name} {threading.current_thread().name.split('_')[0]}")

    monkeypatch.setattr(pytest_support, "ensure_image", fake_image)
    monkeypatch.setattr(pytest_support, "debian_package", lambda out, report: made.append(f"deb {out.name}"))

    booting_first = SimpleNamespace(stash=pytest.Stash())
    pytest_support.state(booting_first).suites = ["host"]  # type: ignore[arg-type]
    pytest_support.prepare_early(booting_first, first_item_boots=True)  # type: ignore[arg-type]
    assert pytest_support.state(booting_first).preparing is None  # type: ignore[arg-type]

    for suites, expected in ((["powercut"], ["image image-build.log prepare"]),
                             (["powercut", "host"], ["image image-build.log prepare", "deb deb"])):
        made.clear()
        release.clear()
        config = SimpleNamespace(stash=pytest.Stash())
        pytest_support.state(config).suites = suites  # type: ignore[arg-type]
        pytest_support.prepare_early(config, first_item_boots=False)  # type: ignore[arg-type]
        assert made == []  # it returned at once; the work goes on beside the caller
        release.set()
        pytest_support.shutdown(config)  # type: ignore[arg-type]
        assert made == expected
