from __future__ import annotations

import os
import shutil
import stat
import textwrap
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def no_background_work_outlives_its_test():
    """A step that fails before lvcreate does not wait for its repository check (the process exits); in
    one pytest process that thread would run on into the next test, under that test's PATH and fakes."""
    yield
    import threading

    for thread in threading.enumerate():
        if thread.name == "xenbackup-background":
            thread.join(timeout=120)


@pytest.fixture
def data() -> Path:
    return DATA


@pytest.fixture
def write_config(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "xenbackup.toml"
        path.write_text(textwrap.dedent(text))
        return path
    return write


@pytest.fixture
def fake_bin(tmp_path: Path):
    """Write an executable fake of a system tool that records its argv and prints canned output."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"

    def make(name: str, stdout: str = "", code: int = 0, stderr: str = "") -> Path:
        out = tmp_path / f"{name}.stdout"
        out.write_text(stdout)
        err = tmp_path / f"{name}.stderr"
        err.write_text(stderr)
        script = bindir / name
        script.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "{name} $*" >> "{log}"\n'
            f'cat "{out}"\ncat "{err}" >&2\nexit {code}\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return script

    make.calls = log  # type: ignore[attr-defined]
    make.dir = bindir  # type: ignore[attr-defined]
    return make


@pytest.fixture
def no_path_lvm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A PATH on which every LVM tool is a recorder, to prove a code path never reaches LVM."""
    bindir = tmp_path / "trap"
    bindir.mkdir()
    trap = tmp_path / "lvm-was-called"
    for name in ("lvcreate", "lvremove", "lvextend", "lvs", "vgs", "mount", "umount", "restic"):
        p = bindir / name
        p.write_text(f"#!/bin/sh\necho {name} \"$@\" >> {trap}\nexit 0\n")
        p.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ.get('PATH', '')}")
    return trap


@pytest.fixture
def logging_restic(tmp_path: Path):
    """The real restic behind a wrapper that appends each call's arguments to a log: (wrapper, log)."""
    real = shutil.which("restic")
    if real is None:
        pytest.fail("restic is not installed; the test setup installs it")
    calls = tmp_path / "restic-calls.log"
    wrapper = tmp_path / "logging-restic"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{calls}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, calls
