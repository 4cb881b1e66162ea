"""The `xenbackup` command. The unit's cleanup step after a good run ends here without loading the rest
of xenbackup (see handoff), and its prepare and backup steps start restic here before loading it (see
headstart); everything else goes on to the command line parser."""

from __future__ import annotations

import sys

from . import handoff


def main() -> None:
    argv = sys.argv[1:]
    done = handoff.taken(argv)
    if done is not None:
        print(done, file=sys.stderr)
        sys.exit(0)
    started = None
    if argv[:2] in (["step", "prepare"], ["step", "backup"]):
        from . import headstart

        started = headstart.start(argv)
    try:
        from .cli import main as cli_main

        code = cli_main(argv)
    finally:
        if started is not None:
            from .run import stop_head_start

            stop_head_start()
    sys.exit(code)
