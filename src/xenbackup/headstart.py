"""A unit's steps start their first restic before they load the rest of xenbackup.

restic's own start (its binary, the key derivation, the index) and a step's interpreter with its imports and
config each cost most of a second under emulation. Two of them wait on restic:
- the backup step's first `restic backup`, inside the snapshot's life. The prepare step knows it: it
  rehearses the backup step's own code up to the spawn (run.rehearsal) and leaves that command (argv,
  working directory, stdin, environment) in `$RUNTIME_DIRECTORY/.headstart/$INVOCATION_ID`;
- the prepare step's repository key check, which `lvcreate` waits for. A backup step that stored its data
  rehearses it and leaves it in `$RUNTIME_DIRECTORY/.headstart/VM.prepare` for the VM's next run.
`xenbackup step backup VM` and `xenbackup step prepare VM` spawn the command left for them first thing, so
restic runs while Python imports. The runner takes the running process only when the step's own code asks
for the same command in every byte (run.run, run.stream). A backup step's process that is not the one asked
for is stopped at once; a key check left by the last run that no longer matches (the config changed) is
stopped when the step ends. Either way the step starts its own command as usual.

No secret is written to the file: environment values that are secrets are read again here from the files
they came from ([repository] environment_file, the `restic-environment` credential), and a command that
needs any other secret (a password in the repository URL) gets no head start.

Only os, time and marshal are imported here: this module runs before the rest of xenbackup is loaded.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half: signal itself imports enum
import marshal
import os
import time

from . import envfile, handoff

# typing and collections cost an interpreter that has nothing else to load more than the rest of this.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

KIND = "headstart"
# Which step a command is left for, and by whom:
BACKUP = "backup"    # this invocation's backup step, by its prepare step: the first `restic backup`
PREPARE = "prepare"  # the VM's next prepare step, by a backup step: the repository key check


class Started:
    """A process this module started, and exactly what it runs."""

    def __init__(self, step: str, pid: int, argv: list[str], env: dict[str, str], cwd: str | None,
                 stdin: str | None, stdout: int, stderr: int) -> None:
        self.step = step
        self.pid = pid
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.at = time.monotonic()

    def runs(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, stdin: str | None) -> bool:
        return self.argv == list(argv) and self.env == dict(env) and self.cwd == cwd and self.stdin == stdin


# The one process start() started and nothing took yet.
_held: list[Started] = []


def plan_path(step: str, vm: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Where the command left for `step` of `vm` lives; None outside a systemd unit."""
    path = handoff.invocation_file(KIND, environ)
    if path is None or step == BACKUP:
        return path
    if step != PREPARE or not vm or vm.startswith(".") or "/" in vm:
        return None
    # Named by the VM, not by an invocation: the next run is another invocation of the unit.
    return os.path.join(os.path.dirname(path), f"{vm}.{PREPARE}")


def leave(step: str, vm: str, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, stdin: str | None,
          env_files: Sequence[str], environ: Mapping[str, str] = os.environ) -> None:
    """Leave `step` of `vm` the command to start first. `env` holds no secret: those come from `env_files`
    (the later one winning) for every key `env` lacks."""
    path = plan_path(step, vm, environ)
    if path is None:
        raise OSError("not in a systemd unit with a runtime directory")
    plan = {"vm": vm, "argv": list(argv), "env": dict(env), "cwd": cwd, "stdin": stdin,
            "env_files": list(env_files)}
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(marshal.dumps(plan))
    os.replace(temporary, path)


def discard(environ: Mapping[str, str] = os.environ) -> None:
    """Remove this invocation's backup command, if no backup step took it."""
    path = plan_path(BACKUP, "", environ)
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return


def _plan(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, object] | None:
    if len(argv) != 3 or argv[0] != "step" or argv[1] not in (BACKUP, PREPARE):
        return None
    path = plan_path(argv[1], argv[2], environ)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
        os.unlink(path)
        plan = marshal.loads(data)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if not isinstance(plan, dict) or plan.get("vm") != argv[2]:
        return None
    return plan


def _which(program: str, path: str) -> str | None:
    """The file exec would run for `program`, searched in `path` as subprocess searches the child's PATH."""
    if "/" in program:
        return program
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def start(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Started | None:
    """For the unit's own `step backup VM` and `step prepare VM`: start the command left for it, if any.
    Anything unexpected means no head start; the step then runs as it would without one."""
    plan = _plan(argv, environ)
    if plan is None:
        return None
    command, env, cwd, stdin, files = (plan.get(k) for k in ("argv", "env", "cwd", "stdin", "env_files"))
    if (not isinstance(command, list) or not command or not isinstance(env, dict) or not isinstance(files, list)
            or not (cwd is None or isinstance(cwd, str)) or not (stdin is None or isinstance(stdin, str))):
        return None
    secrets: dict[str, str] = {}
    try:
        for path in files:
            secrets.update(envfile.parse(path))
    except (OSError, ValueError):
        return None
    env = {**{k: v for k, v in secrets.items() if k not in env}, **env}
    program = _which(command[0], env.get("PATH", ""))
    if program is None:
        return None
    pipes: list[int] = []
    try:
        here = os.getcwd()
        pipes.extend(os.pipe2(os.O_CLOEXEC))
        pipes.extend(os.pipe2(os.O_CLOEXEC))
        out_r, out_w, err_r, err_w = pipes
        # posix_spawn has no working directory of its own; nothing else runs in this process yet.
        if cwd is not None:
            os.chdir(cwd)
        try:
            # As subprocess does: stdin from the file or /dev/null, and the signals Python ignores restored.
            pid = os.posix_spawn(program, command, env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, stdin if stdin is not None else os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)],
                setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
        finally:
            os.chdir(here)
    except OSError:
        for fd in pipes:
            os.close(fd)
        return None
    os.close(out_w)
    os.close(err_w)
    started = Started(str(argv[1]), pid, command, env, cwd, stdin, out_r, err_r)
    _held.append(started)
    return started


def holds() -> bool:
    """Whether start() started a process that nothing took yet."""
    return bool(_held)


def take() -> Started | None:
    """The process start() started, once; the caller then owns it (and stops it)."""
    return _held.pop() if _held else None


def take_if(wanted: Callable[[Started], bool]) -> Started | None:
    """The process start() started, if `wanted` says so; the caller then owns it. Safe from threads: the
    prepare step runs LVM's commands and the key check at once."""
    started = _held[0] if _held else None
    if started is None or not wanted(started):
        return None
    try:
        _held.remove(started)
    except ValueError:  # another thread took it
        return None
    return started
