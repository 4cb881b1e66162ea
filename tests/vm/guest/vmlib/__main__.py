"""The vmlib helpers as commands, for in-guest scripts such as the demo.

PYTHONPATH=tests/vm/guest python3 -m vmlib COMMAND ...

xen-start                   start the Xen toolstack in dom0 (blkback, xen.service)
seed-layout [--fs xfs]      build the seed manual's layout on virtio-xbtest1
seed-teardown               remove it again (umount, lvremove, vgremove, pvremove, wipefs)
domu-start CONFIG NAME      xl create, wait for the guest's READY; print its marker
domu-stop NAME              xl shutdown -w, then wait until NAME has left `xl list`
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import xen
from .cmd import CommandFailed
from .storage import BLANK_DISKS, FILESYSTEMS, SEED_VG, clear_disk, create_seed_layout, remove_volume_group


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m vmlib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("xen-start")
    seed = commands.add_parser("seed-layout")
    seed.add_argument("--fs", choices=FILESYSTEMS, default="ext4")
    commands.add_parser("seed-teardown")
    start = commands.add_parser("domu-start")
    start.add_argument("config", type=Path)
    start.add_argument("name")
    stop = commands.add_parser("domu-stop")
    stop.add_argument("name")
    options = parser.parse_args(argv)

    try:
        if options.command == "xen-start":
            xen.start_xen()
            print("xen toolstack running (xenstored, xenconsoled), xen-blkback loaded")
        elif options.command == "seed-layout":
            remove_volume_group(SEED_VG)
            clear_disk(BLANK_DISKS[0])
            layout = create_seed_layout(options.fs, BLANK_DISKS[0])
            print(f"{layout.device} ({layout.fstype}) mounted at {layout.mountpoint}; files of vm1 in {layout.vmdir}")
            print(f"marker={layout.marker}")
        elif options.command == "seed-teardown":
            remove_volume_group(SEED_VG, BLANK_DISKS[0])
        elif options.command == "domu-start":
            domain = xen.create(options.config, options.name)
            print(f"{options.name}: xl create {domain.create_seconds:.1f}s, ready {domain.ready_seconds:.1f}s later")
            print(f"marker={domain.marker}")
        elif options.command == "domu-stop":
            started = time.monotonic()
            xen.shutdown(options.name)
            print(f"{options.name}: shut down and gone from xl list after {time.monotonic() - started:.1f}s")
    except (CommandFailed, AssertionError) as exc:
        print(f"vmlib {options.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
