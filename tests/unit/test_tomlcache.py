"""The parsed config kept between a unit's steps is used only while the file is the one it was parsed from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xenbackup import config, tomlcache

CONFIG = """
[repository]
url = "/srv/restic"

[vm.vm1]
snapshot_size = "1G"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
"""


@pytest.fixture
def unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A unit's runtime directory; the settle time is waived so a test need not wait for it."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    monkeypatch.setattr(tomlcache, "SETTLED_NS", -1)
    return runtime


def counting_parse(calls: list[bytes]):  # type: ignore[no-untyped-def]
    import tomllib

    def parse(data: bytes) -> dict[str, object]:
        calls.append(data)
        return tomllib.loads(data.decode())
    return parse


def test_the_same_file_is_parsed_once_and_loads_the_same_config(tmp_path: Path, unit: Path) -> None:
    path = tmp_path / "xenbackup.toml"
    path.write_text(CONFIG)
    calls: list[bytes] = []
    first = tomlcache.load(str(path), counting_parse(calls))
    assert tomlcache.load(str(path), counting_parse(calls)) == first and len(calls) == 1
    assert config.load(str(path)) == config.parse(CONFIG, str(path))


def test_a_rewritten_file_is_parsed_again_even_with_the_old_size_and_times(tmp_path: Path, unit: Path) -> None:
    path = tmp_path / "xenbackup.toml"
    path.write_text(CONFIG)
    assert config.load(str(path)).vm("vm1").snapshot_size.amount == 1 << 30
    st = path.stat()
    path.write_text(CONFIG.replace('"1G"', '"2G"'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the inode's change time still moves
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert config.load(str(path)).vm("vm1").snapshot_size.amount == 2 << 30


def test_a_file_written_just_now_is_not_cached(tmp_path: Path, unit: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tomlcache, "SETTLED_NS", 2_000_000_000)
    path = tmp_path / "xenbackup.toml"
    path.write_text(CONFIG)
    config.load(str(path))
    assert not (unit / tomlcache.NAME).exists()


def test_a_damaged_cache_is_parsed_over(tmp_path: Path, unit: Path) -> None:
    path = tmp_path / "xenbackup.toml"
    path.write_text(CONFIG)
    (unit / tomlcache.NAME).write_bytes(b"\x00garbage")
    calls: list[bytes] = []
    assert tomlcache.load(str(path), counting_parse(calls))["repository"] == {"url": "/srv/restic"}
    assert tomlcache.load(str(path), counting_parse(calls))["repository"] == {"url": "/srv/restic"}
    assert len(calls) == 1 and (unit / tomlcache.NAME).stat().st_mode & 0o777 == 0o600


def test_what_marshal_cannot_hold_and_what_does_not_parse_are_never_cached(tmp_path: Path, unit: Path) -> None:
    path = tmp_path / "dated.toml"
    path.write_text("when = 2026-12-01T00:00:00Z\n")
    calls: list[bytes] = []
    assert str(tomlcache.load(str(path), counting_parse(calls))["when"]).startswith("2026-12-01")
    assert not (unit / tomlcache.NAME).exists()
    path.write_text("[repository\n")
    with pytest.raises(config.ConfigError, match=r"\(syntax\)"):
        config.load(str(path))
    assert not (unit / tomlcache.NAME).exists()


def test_outside_a_unit_nothing_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setattr(tomlcache, "SETTLED_NS", -1)
    path = tmp_path / "xenbackup.toml"
    path.write_text(CONFIG)
    calls: list[bytes] = []
    tomlcache.load(str(path), counting_parse(calls))
    tomlcache.load(str(path), counting_parse(calls))
    assert len(calls) == 2 and sorted(os.listdir(tmp_path)) == ["xenbackup.toml"]
