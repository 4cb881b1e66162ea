"""Smoke tests: the guest's systemd and journald behave as the product relies on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlib.cmd import output, run

UNIT_DIR = Path("/run/systemd/system")
SMOKE_UNIT = """\
[Unit]
Description=test bed smoke test %i

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "smoketest %i starting"; exit 3'
ExecStopPost=/bin/sh -c 'echo "result=$SERVICE_RESULT code=$EXIT_CODE status=$EXIT_STATUS" >/run/smoketest-%i.post'
"""


@pytest.fixture
def smoketest_unit() -> Iterator[str]:
    """A templated oneshot unit in /run/systemd/system, removed afterwards."""
    unit = UNIT_DIR / "smoketest@.service"
    unit.write_text(SMOKE_UNIT)
    run("systemctl", "daemon-reload")
    yield "smoketest"
    run("systemctl", "reset-failed", "smoketest@*", check=False)
    unit.unlink()
    for post in Path("/run").glob("smoketest-*.post"):
        post.unlink()
    run("systemctl", "daemon-reload")


def test_exec_stop_post_sees_service_result_after_failing_exec_start(smoketest_unit: str) -> None:
    unit = f"{smoketest_unit}@alpha.service"

    started = run("systemctl", "start", unit, timeout=60, check=False)

    assert started.returncode != 0, "a failing ExecStart= must fail the start job"
    assert Path("/run/smoketest-alpha.post").read_text().split() == ["result=exit-code", "code=exited", "status=3"]
    assert output("systemctl", "show", "-p", "Result", "--value", unit) == "exit-code"
    assert output("systemctl", "is-failed", unit) == "failed"
    run("journalctl", "--sync")
    entries = [json.loads(line) for line in output("journalctl", "-o", "json", "--no-pager", "-u", unit).splitlines()]
    assert "smoketest alpha starting" in [entry.get("MESSAGE") for entry in entries]


def test_pystemd_reads_unit_state_over_dbus() -> None:
    from pystemd.systemd1 import Unit  # Debian's python3-pystemd 0.11

    unit = Unit(b"systemd-journald.service")
    unit.load()

    assert unit.Unit.ActiveState == b"active"
    assert unit.Unit.Id == b"systemd-journald.service"
