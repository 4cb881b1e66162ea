"""Changed-block logic: thin_delta's XML, the segments it dirties, and when a base may be trusted."""

from __future__ import annotations

import pytest

from xenbackup import names
from xenbackup.thin import (
    Base,
    DeltaError,
    Facts,
    changed_segments,
    parent_listed,
    parse_delta,
    plan_segments,
    segment_count,
    why_not_incremental,
)

MiB = 1024 * 1024
# The geometry these tests reason in; the product's default (thin.SEGMENT_SIZE) is chosen in BENCHMARKS.md.
SEG = 64 * MiB

# As thin_delta 0.9 prints it: 64 KiB blocks (128 sectors), ranges in blocks.
DELTA = """<superblock uuid="" time="3" transaction="7" data_block_size="128" nr_data_blocks="16384">
  <diff left="4" right="6">
    <same begin="0" length="1000"/>
    <different begin="1000" length="2"/>
    <same begin="1002" length="8000"/>
    <right_only begin="9002" length="1"/>
    <left_only begin="16383" length="1"/>
  </diff>
</superblock>
"""


def test_changed_ranges_are_different_left_only_and_right_only() -> None:
    delta = parse_delta(DELTA, 4, 6)
    assert delta.block_bytes == 64 * 1024
    assert delta.changed == ((1000, 2), (9002, 1), (16383, 1))
    assert delta.changed_bytes == 4 * 64 * 1024


def test_changed_segments_by_byte_offset() -> None:
    # block 1000 at 62.5 MiB is in segment 0; 1001 too; 9002 at ~562 MiB in segment 8; the last block in 15.
    assert changed_segments(parse_delta(DELTA, 4, 6), SEG) == frozenset({0, 8, 15})


def test_a_range_across_a_segment_boundary_dirties_both() -> None:
    xml = DELTA.replace('<different begin="1000" length="2"/>', '<different begin="1023" length="2"/>')
    assert {0, 1} <= changed_segments(parse_delta(xml, 4, 6), SEG)


def test_no_change_no_segment() -> None:
    xml = '<superblock data_block_size="128"><diff left="1" right="2"><same begin="0" length="9"/></diff></superblock>'
    assert changed_segments(parse_delta(xml, 1, 2), SEG) == frozenset()


@pytest.mark.parametrize(("xml", "why"), [
    ("<superblock", "cannot read"),
    ('<superblock data_block_size="128"><diff left="4" right="5"/></superblock>', "not 4 and 6"),
    ('<superblock><diff left="4" right="6"/></superblock>', "data_block_size"),
    ('<superblock data_block_size="128"></superblock>', "no single <diff>"),
    ('<superblock data_block_size="128"><diff left="4" right="6"><moved begin="1" length="1"/></diff></superblock>',
     "unknown range"),
    ('<superblock data_block_size="128"><diff left="4" right="6"><same begin="1"/></diff></superblock>',
     "numeric"),
    ('<superblock data_block_size="128"><diff left="4" right="6"><different begin="1" length="0"/></diff>'
     '</superblock>', "empty"),
])
def test_untrustworthy_delta_is_an_error(xml: str, why: str) -> None:
    with pytest.raises(DeltaError, match=why):
        parse_delta(xml, 4, 6)


def _base(**kw: object) -> Base:
    fields: dict[str, object] = dict(origin="vg/disk", origin_bytes=1024 * MiB, lv="vg/disk.xb-vm1-1", thin_id=4,
                                     pool="vg/pool", segment_size=SEG, restic_snapshot="a" * 64,
                                     mtimes_ns=tuple(range(100, 116)))
    fields.update(kw)
    return Base(**fields)  # type: ignore[arg-type]


def _facts(**kw: object) -> Facts:
    fields: dict[str, object] = dict(origin="vg/disk", origin_bytes=1024 * MiB, pool="vg/pool", base_lv_exists=True,
                                     base_lv_origin="disk", base_thin_id=4, parent_in_repository=True)
    fields.update(kw)
    return Facts(**fields)  # type: ignore[arg-type]


def test_matching_base_is_used() -> None:
    assert why_not_incremental(_base(), _facts(), SEG) is None


@pytest.mark.parametrize(("base", "facts", "why"), [
    (None, _facts(), "no base"),
    (_base(origin="vg/other"), _facts(), "not vg/disk"),
    (_base(), _facts(origin_bytes=2048 * MiB), "changed size"),
    (_base(), _facts(pool="vg/pool2"), "moved to thin pool"),
    (_base(), _facts(base_lv_exists=False, base_lv_origin="", base_thin_id=None), "is gone"),
    (_base(), _facts(base_lv_origin="other"), "not a snapshot of"),
    (_base(), _facts(base_thin_id=9), "thin device id 9"),
    (_base(), _facts(parent_in_repository=False), "no longer in the repository"),
    (_base(segment_size=32 * MiB, mtimes_ns=tuple(range(32))), _facts(), "segment size"),
])
def test_mismatched_base_means_full_read(base: Base | None, facts: Facts, why: str) -> None:
    reason = why_not_incremental(base, facts, SEG)
    assert reason is not None and why in reason


def test_unchanged_segments_keep_the_parents_mtime() -> None:
    plan = plan_segments(1024 * MiB, 10**18, _base(), {3, 15}, segment_size=SEG)
    assert [s.mtime_ns for s in plan] == [100, 101, 102, 10**18, *range(104, 115), 10**18]
    assert [s.offset for s in plan][:3] == [0, SEG, 2 * SEG]
    assert all(s.size == SEG for s in plan)


def test_changed_segment_mtime_moves_forward_even_if_the_clock_did_not() -> None:
    plan = plan_segments(1024 * MiB, 50, _base(), {0}, segment_size=SEG)
    assert plan[0].mtime_ns == 101


def test_no_base_or_no_delta_makes_every_segment_new() -> None:
    for base, changed in ((None, None), (_base(), None)):
        plan = plan_segments(1024 * MiB, 10**18, base, changed, segment_size=SEG)
        assert {s.mtime_ns for s in plan} == {10**18}


def test_last_segment_is_short_for_a_size_not_a_multiple() -> None:
    plan = plan_segments(100 * MiB + 4096, 1, None, None, segment_size=SEG)
    assert [s.size for s in plan] == [SEG, 36 * MiB + 4096]
    assert segment_count(0, SEG) == 1


def test_base_round_trips_and_rejects_a_wrong_segment_list() -> None:
    base = _base()
    assert Base.from_json(base.to_json()) == base
    with pytest.raises(DeltaError, match="wrong number"):
        Base.from_json(_base(mtimes_ns=(1, 2)).to_json())


def test_segment_names_sort_in_device_order() -> None:
    assert sorted(names.segment_file(i) for i in (10, 2, 100)) == [names.segment_file(i) for i in (2, 10, 100)]
    assert names.lv_base_tag("vm1") == "xenbackup-base:vm1"
    assert not names.lv_base_tag("vm1").startswith(names.LV_VM_TAG_PREFIX)


def test_parent_found_by_the_short_id_restic_prints_after_a_backup() -> None:
    full = "f351c7b0" + "9" * 56
    assert parent_listed("f351c7b0", ["a" * 64, full])
    assert parent_listed(full, [full])
    assert not parent_listed("f351c7b1", [full])
    assert not parent_listed("", [full])
