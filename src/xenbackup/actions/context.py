"""What every action works with: the config and one adapter per outside system."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import hypervisor as hv_mod
from ..config import Config
from ..hypervisor import Hypervisor, HypervisorError
from ..lvm import LogicalVolume, Lvm, LvmError
from ..model import VM, Disk
from ..mount import Mounter
from ..repository import Restic
from ..run import CommandError
from ..state import Slots, StateStore

if TYPE_CHECKING:
    from ..thinpool import ThinPools


class StepError(Exception):
    """A step failed for a reason worth one clear line in the journal."""


class RestoreError(Exception):
    """The restore was refused or failed; the message says why and what state the VM is in."""


@dataclass
class Context:
    cfg: Config
    lvm: Lvm
    mounter: Mounter
    restic: Restic
    store: StateStore
    slots: Slots
    host: str

    @classmethod
    def from_config(cls, cfg: Config) -> Context:
        store = StateStore(cfg.settings.runtime_dir, cfg.settings.state_dir)
        return cls(
            cfg=cfg,
            lvm=Lvm(cfg.commands),
            mounter=Mounter(cfg.commands),
            restic=Restic(cfg.repository, cfg.command("restic"), version_cache=store.restic_version_path()),
            store=store,
            slots=Slots(cfg.settings.runtime_dir, cfg.settings.max_parallel),
            host=cfg.repository.hostname,
        )

    def pools(self) -> ThinPools:
        """Thin pools' metadata snapshots: the sweep and cleanup release what a killed run left reserved."""
        from ..thinpool import ThinPools  # its thin_delta parsing is no concern of a backup step

        return ThinPools(self.cfg.commands, self.cfg.settings.state_dir)

    def hypervisor(self, vm: VM) -> Hypervisor:
        return hv_mod.for_vm(vm, self.cfg.commands)

    def disks(self, vm: VM, volumes: Sequence[LogicalVolume] | None = None) -> tuple[Disk, ...]:
        """The VM's disks: as configured, else read from its domain definition and mapped to LVs."""
        if not vm.discovers_disks:
            return vm.disks
        from ..discovery import DiscoveryError, SystemProbe, discover

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
