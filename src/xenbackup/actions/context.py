"""What every action works with: the config and one adapter per outside system."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from ..config import Config
from ..model import VM, Disk
from ..run import CommandError
from ..state import Slots, StateStore

if TYPE_CHECKING:
    from ..hypervisor import Hypervisor
    from ..lvm import LogicalVolume, Lvm
    from ..mount import Mounter
    from ..repository import Restic
    from ..thinpool import ThinPools


class StepError(Exception):
    """A step failed for a reason worth one clear line in the journal."""


class RestoreError(Exception):
    """The restore was refused or failed; the message says why and what state the VM is in."""


@dataclass
class Context:
    """The adapters are built, and their modules imported, on first use: each unit step is a fresh
    interpreter, and the cleanup of a run that finished asks neither LVM nor the repository anything."""

    cfg: Config
    store: StateStore
    slots: Slots
    host: str

    @classmethod
    def from_config(cls, cfg: Config) -> Context:
        return cls(
            cfg=cfg,
            store=StateStore(cfg.settings.runtime_dir, cfg.settings.state_dir),
            slots=Slots(cfg.settings.runtime_dir, cfg.settings.max_parallel),
            host=cfg.repository.hostname,
        )

    @cached_property
    def lvm(self) -> Lvm:
        from ..lvm import Lvm

        return Lvm(self.cfg.commands, monitor=self.cfg.settings.dmeventd_monitoring)

    @cached_property
    def mounter(self) -> Mounter:
        from ..mount import Mounter

        return Mounter(self.cfg.commands)

    @cached_property
    def restic(self) -> Restic:
        from ..repository import Restic

        return Restic(self.cfg.repository, self.cfg.command("restic"),
                      version_cache=self.store.restic_version_path())

    def pools(self) -> ThinPools:
        """Thin pools' metadata snapshots: the sweep and cleanup release what a killed run left reserved."""
        from ..thinpool import ThinPools  # its thin_delta parsing is no concern of a backup step

        return ThinPools(self.cfg.commands, self.cfg.settings.state_dir)

    def hypervisor(self, vm: VM) -> Hypervisor:
        from ..hypervisor import for_vm

        return for_vm(vm, self.cfg.commands)

    def disks(self, vm: VM, volumes: Sequence[LogicalVolume] | None = None) -> tuple[Disk, ...]:
        """The VM's disks: as configured, else read from its domain definition and mapped to LVs."""
        if not vm.discovers_disks:
            return vm.disks
        from ..discovery import DiscoveryError, SystemProbe, discover
        from ..hypervisor import HypervisorError
        from ..lvm import LvmError

        try:
            disks = discover(vm, self.hypervisor(vm), self.lvm, SystemProbe(self.cfg.command("losetup")), volumes)
        except (DiscoveryError, HypervisorError, LvmError) as exc:
            raise StepError(str(exc)) from None
        except CommandError as exc:
            raise StepError(f"cannot read the disks of {vm.name}: {exc}") from None
        for other in self.cfg.vms.values():
            claimed = {str(d.lv) for d in other.disks}
            for disk in disks:
                if other.name != vm.name and str(disk.lv) in claimed:
                    raise StepError(f"{disk.lv} ({disk.source}) of {vm.name} is configured as a disk of "
                                    f"vm.{other.name} too; one LV belongs to one VM")
        return disks
