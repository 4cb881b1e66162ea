"""The `xenbackup` command. The unit's cleanup step after a good run ends here without loading the rest
of xenbackup (see handoff); everything else goes on to the command line parser."""

from __future__ import annotations

import sys

from . import handoff


def main() -> None:
    argv = sys.argv[1:]
    done = handoff.taken(argv)
    if done is not None:
        print(done, file=sys.stderr)
        sys.exit(0)
    from .cli import main as cli_main

    sys.exit(cli_main(argv))
