"""The parsed TOML of the config file, kept in the unit's runtime directory between a run's steps.

Each of a unit's steps is a fresh interpreter, and importing tomllib (its regular expressions are compiled
at import) costs one of them more under emulation than parsing does; the backup step pays it inside the
snapshot's lifetime. A step in a unit stores what tomllib made of the file in `$RUNTIME_DIRECTORY`, keyed by
the file's identity, and the next step that finds the same file takes it from there without importing
tomllib. Only tomllib's output is kept: validation runs on every load, as before.
"""

from __future__ import annotations

import contextlib
import marshal
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

NAME = ".config-cache"  # a VM's name cannot start with a dot, so no VM's directory is this file
# A file written less than this long ago is not cached: the kernel's file times are coarse (a clock tick),
# so a second write within the same tick could keep the first write's times (git's "racily clean" case).
SETTLED_NS = 2_000_000_000


def _cache_path(environ: Mapping[str, str]) -> str | None:
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, NAME) if os.path.isabs(runtime) else None


def _identity(path: str, st: os.stat_result) -> tuple[int | str, ...]:
    # hexversion: marshal's format may change with the interpreter.
    return (sys.hexversion, os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)


def _cached(cache: str, key: tuple[int | str, ...]) -> dict[str, Any] | None:
    try:
        with open(cache, "rb") as f:
            stored = marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if isinstance(stored, tuple) and len(stored) == 2 and stored[0] == key and isinstance(stored[1], dict):
        return stored[1]
    return None


def _store(cache: str, key: tuple[int | str, ...], raw: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only costs the next step a parse."""
    try:
        blob = marshal.dumps((key, raw))
    except ValueError:  # a TOML date or time: marshal cannot hold it
        return
    temporary = f"{cache}.{os.getpid()}"
    try:
        # 0600: the config may hold a secret (a password in a repository URL).
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(temporary, cache)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def load(path: str, parse: Callable[[bytes], dict[str, Any]],
         environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """What `parse(bytes)` makes of the file at path, from the runtime directory's cache when it is current.

    Raises OSError when the file cannot be read, and whatever parse raises."""
    cache = _cache_path(environ)
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        key = _identity(path, before)
        if cache is not None:
            found = _cached(cache, key)
            if found is not None:
                return found
        data = f.read()
        after = os.fstat(f.fileno())
    raw = parse(data)
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > SETTLED_NS
    if cache is not None and settled and _identity(path, after) == key:
        _store(cache, key, raw)
    return raw
