from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xenbackup import journal
from xenbackup.journal import MessageId, journal_fields, syslog_priority
from xenbackup.names import escape_instance, unescape_instance

CATALOG = Path(__file__).parents[2] / "packaging" / "xenbackup.catalog"


def record(msg: str, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("xenbackup.x", level, __file__, 10, msg, (), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_fields_carry_identifier_vm_phase_and_unit() -> None:
    with journal.context(vm="vm1", phase="snapshot"):
        fields = journal_fields(record("hello"))
    assert fields["SYSLOG_IDENTIFIER"] == "xenbackup"
    assert fields["XENBACKUP_VM"] == "vm1" and fields["XENBACKUP_PHASE"] == "snapshot"
    assert fields["OBJECT_SYSTEMD_UNIT"] == "xenbackup@vm1.service"
    assert fields["PRIORITY"] == "6" and fields["MESSAGE"] == "hello"
    assert "XENBACKUP_VM" not in journal_fields(record("outside"))


def test_the_unit_named_for_a_vm_is_the_one_the_timer_starts() -> None:
    assert journal.unit_for("web-01") == "xenbackup@web\\x2d01.service"
    with journal.context(vm="web-01"):
        fields = journal_fields(record("hello"))
    assert fields["OBJECT_SYSTEMD_UNIT"] == "xenbackup@web\\x2d01.service"
    assert fields["XENBACKUP_VM"] == "web-01"


ESCAPES = {"web-01": "web\\x2d01", "vm_1": "vm_1", "db.example": "db.example", ".hidden": "\\x2ehidden",
           "x+y": "x\\x2by", "a b": "a\\x20b", "\u00fc": "\\xc3\\xbc", "-x": "\\x2dx", "_:x": "_:x"}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_follows_systemd_escape_rules(name: str) -> None:
    assert escape_instance(name) == ESCAPES[name]
    assert unescape_instance(escape_instance(name)) == name


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape is not installed")
def test_escape_agrees_with_the_real_systemd_escape() -> None:
    names = [*ESCAPES, "vm-1.example-2", "a+b_c:d", "x~y"]
    real = subprocess.run(["systemd-escape", "--", *names], capture_output=True, text=True, check=True).stdout.split()
    assert [escape_instance(n) for n in names] == real


def test_message_id_and_extra_fields() -> None:
    fields = journal_fields(record("x", message_id=MessageId.OVERFLOW.value, fields={"peak_fill": 100}))
    assert fields["MESSAGE_ID"] == MessageId.OVERFLOW.value
    assert fields["XENBACKUP_PEAK_FILL"] == "100"


def test_priorities_are_syslog_levels() -> None:
    assert [syslog_priority(level) for level in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


def test_catalog_explains_every_message_id() -> None:
    text = CATALOG.read_text()
    ids = re.findall(r"^-- ([0-9a-f]{32})$", text, flags=re.M)
    assert sorted(ids) == sorted(m.value for m in MessageId)
    for block in text.split("\n-- ")[1:]:
        assert "\nSubject: " in block and "\nDefined-By: xenbackup" in block


def test_unit_names_round_trip_through_their_one_builder() -> None:
    from xenbackup import names

    assert names.service("web-01") == "xenbackup@web\\x2d01.service"
    assert names.timer("db.1") == "xenbackup@db.1.timer"
    assert names.vm_of_unit(names.service("web-01")) == "web-01"
    assert names.vm_of_unit(names.timer("ü-vm")) == "ü-vm"
    assert names.vm_of_unit("xenbackup-prune.timer") is None
    assert names.restic_filter("vm1", run_id="r1", host="h") == ["xenbackup", "host:h", "vm:vm1", "run:r1"]
    assert names.lv_tags("vm1", "r1") == ["xenbackup", "xenbackup-vm:vm1", "xenbackup-run:r1"]
