from __future__ import annotations

import logging
import re
from pathlib import Path

from xenbackup import journal
from xenbackup.journal import MessageId, journal_fields, syslog_priority

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
