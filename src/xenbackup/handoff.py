"""A run whose backup step went well is finished by that step; the unit's cleanup step then only confirms it.

Everything cleanup would do after a good run (release the snapshots, write the run record and the metrics,
log the verdict, clear the run state) the backup step does itself, in the process that already has the
config and the run loaded. It then leaves a marker named by the unit's invocation in systemd's runtime
directory. `xenbackup step cleanup VM` that finds its own invocation's marker for that VM, with systemd
reporting success, has nothing left to do and exits before it loads anything else: a whole interpreter's
imports and config fewer per run. Every other case (a failed or stopped run, a marker of another
invocation or VM, no marker, a step run by hand outside a unit) takes the full cleanup.

The unit's own `ExecStopPost=` makes the same check in a shell before it starts any Python, and runs
`xenbackup step cleanup VM` only when the check fails; `taken` serves a drop-in that runs the step itself.

Only os is imported here: this module runs before the rest of xenbackup is loaded.
"""

from __future__ import annotations

import os

# typing and collections cost an interpreter that has nothing else to load more than the rest of this.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_HEX = frozenset("0123456789abcdef")


def invocation_file(kind: str, environ: Mapping[str, str]) -> str | None:
    """`$RUNTIME_DIRECTORY/.KIND/$INVOCATION_ID`: a file one step of a unit's run leaves for a later step of
    the same run. None outside a systemd unit."""
    invocation = environ.get("INVOCATION_ID", "")
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not os.path.isabs(runtime) or len(invocation) != 32 or not _HEX.issuperset(invocation):
        return None
    # A VM's name cannot start with a dot, so no VM's own directory is this one.
    return os.path.join(runtime, f".{kind}", invocation)


def _marker(environ: Mapping[str, str]) -> str | None:
    return invocation_file("finished", environ)


def possible(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs in a unit whose cleanup step can find a marker."""
    return _marker(environ) is not None


def leave(vm: str, environ: Mapping[str, str] = os.environ) -> None:
    """Tell this invocation's cleanup step that the run of `vm` is finished."""
    path = _marker(environ)
    if path is None:
        raise OSError("not in a systemd unit with a runtime directory")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(f"{vm}\n")  # a line, for the unit's ExecStopPost= shell to `read`
    os.replace(temporary, path)


def discard(environ: Mapping[str, str] = os.environ) -> None:
    """Remove this invocation's marker, if any: the full cleanup ran instead."""
    path = _marker(environ)
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return


def taken(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> str | None:
    """For the unit's own `step cleanup VM` of a run its backup step finished: a line for the log, and the
    marker is consumed. None in every other case, and then the full cleanup runs."""
    if len(argv) != 3 or list(argv[:2]) != ["step", "cleanup"] or environ.get("SERVICE_RESULT") != "success":
        return None
    path = _marker(environ)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as marker:
            vm = marker.read()
    except OSError:
        return None
    if vm != f"{argv[2]}\n":
        return None
    os.unlink(path)
    return f"cleanup after result=success: the backup step of {argv[2]} finished the run; nothing left to release"
