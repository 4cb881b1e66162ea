"""KEY=VALUE files ([repository] environment_file, the `restic-environment` credential).

Only os is needed here: the backup step's head start (see headstart) reads these files before the rest of
xenbackup is loaded."""

from __future__ import annotations


class EnvFileError(ValueError):
    """A line that is not KEY=VALUE."""


def parse(path: str) -> dict[str, str]:
    env: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip().isidentifier():
                raise EnvFileError(f"{path}:{number}: expected KEY=VALUE")
            env[key.strip()] = value.strip().strip('"')
    return env
