"""Hypervisor adapter: xl (Xen), virsh (KVM/libvirt) or none, behind one small interface."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from .model import VM, HypervisorKind
from .run import CommandError, run

log = logging.getLogger(__name__)


class HypervisorError(Exception):
    pass


class Hypervisor(Protocol):
    def is_running(self, name: str) -> bool: ...
    def shutdown(self, name: str, timeout: float) -> None: ...
    def start(self, name: str, domain_config: str | None) -> None: ...


class NoHypervisor:
    """Plain LVs: nothing to stop or start."""

    def is_running(self, name: str) -> bool:
        return False

    def shutdown(self, name: str, timeout: float) -> None:
        return None

    def start(self, name: str, domain_config: str | None) -> None:
        return None


class _Polling:
    sleep: Callable[[float], None] = staticmethod(time.sleep)
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def is_running(self, name: str) -> bool:
        raise NotImplementedError

    def _wait_gone(self, name: str, timeout: float) -> bool:
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            if not self.is_running(name):
                return True
            self.sleep(0.5)
        return not self.is_running(name)


class Xl(_Polling):
    def __init__(self, xl: str = "xl") -> None:
        self.xl = xl

    def is_running(self, name: str) -> bool:
        # `xl domid` fails once the domain has really left; `xl shutdown -w` returns earlier.
        return run([self.xl, "domid", name], check=False).returncode == 0

    def shutdown(self, name: str, timeout: float) -> None:
        if not self.is_running(name):
            return
        log.info("shutting down Xen domain %s", name)
        try:
            run([self.xl, "shutdown", "-w", name], timeout=timeout)
        except CommandError as err:
            log.warning("xl shutdown of %s did not finish: %s", name, err)
        if not self._wait_gone(name, timeout):
            log.warning("domain %s ignored shutdown for %.0f s; destroying it", name, timeout)
            run([self.xl, "destroy", name])
            if not self._wait_gone(name, 30):
                raise HypervisorError(f"domain {name} is still present after xl destroy")

    def start(self, name: str, domain_config: str | None) -> None:
        if not domain_config:
            raise HypervisorError(f"no domain config for {name}: set vm.{name}.domain_config")
        run([self.xl, "create", domain_config])


class Virsh(_Polling):
    def __init__(self, virsh: str = "virsh") -> None:
        self.virsh = virsh

    def is_running(self, name: str) -> bool:
        out = run([self.virsh, "domstate", name], check=False)
        return out.returncode == 0 and out.stdout.strip() not in ("shut off", "crashed", "")

    def shutdown(self, name: str, timeout: float) -> None:
        if not self.is_running(name):
            return
        run([self.virsh, "shutdown", name])
        if not self._wait_gone(name, timeout):
            log.warning("domain %s ignored shutdown for %.0f s; destroying it", name, timeout)
            run([self.virsh, "destroy", name])

    def start(self, name: str, domain_config: str | None) -> None:
        run([self.virsh, "start", name])


def for_vm(vm: VM, commands: Mapping[str, str]) -> Hypervisor:
    if vm.hypervisor is HypervisorKind.XEN:
        return Xl(commands["xl"])
    if vm.hypervisor is HypervisorKind.KVM:
        return Virsh(commands["virsh"])
    return NoHypervisor()
