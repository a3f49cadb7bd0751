"""A live VM: QMP session + read-only guest memory + the vCPUs' registers.

`AttachedVm.attach(socket)` asks QEMU (over QMP) where the guest's RAM lives and what
its vCPUs' control registers are, and maps the memory-backend files read-only
(`scanner.vm.domain` attaches a libvirt domain the same way, through libvirt).
Everything later stages read about a live guest comes through here; it implements
the `VmHandle` protocol (`scanner.vm.handle`), as replayed VMs do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

from scanner.errors import QmpError, VmStateError
from scanner.qemu.qmp import QmpVm, RunState
from scanner.vm.bootprofile import BootProfile, read_boot_profile
from scanner.vm.progress import Sample, sample_threads
from translate import GuestMemory, PageWalker, RamRange, kernel_walker
from translate.vcpu import VcpuState

__all__ = ["ATTACH_TIMEOUT", "AttachedVm", "MemoryOpener"]

#: Attaching (connect, name, RAM layout, mapping, registers) must be done within this.
ATTACH_TIMEOUT = 60.0
#: Opens a VM's guest memory by VM name: its RAM layout and the mapped memory.
MemoryOpener = Callable[[str], Awaitable[tuple[list[RamRange], GuestMemory]]]


class AttachedVm:
    """A VM kscan is attached to: QMP session, mapped RAM, current vCPU state."""

    def __init__(self, qmp: QmpVm, name: str, layout: list[RamRange], mem: GuestMemory,
                 vcpus: list[VcpuState]) -> None:
        self.qmp = qmp
        self.name = name
        self.layout = layout
        self.mem = mem
        self.vcpus = vcpus
        self.uuid: str | None = None  # a libvirt domain's UUID (scanner.vm.domain)
        #: The vCPUs' host thread ids (None: not asked yet; empty: QEMU would not say).
        self._threads: list[int] | None = None

    @classmethod
    async def attach(cls, socket: str | os.PathLike[str], *, owner: int | None = None,
                     timeout: float | None = None) -> AttachedVm:
        """Attach over a QMP socket, within `timeout` seconds in all; guest RAM from its
        memory-backend files. With `owner` (a uid: discovery names the QEMU process's),
        the socket and every memory file must belong to it."""
        path = os.fspath(socket)
        if owner is not None:
            try:
                uid = os.stat(path).st_uid
            except OSError as err:
                raise QmpError(f"cannot stat: {err.strerror}", socket=path) from err
            if uid != owner:
                raise QmpError(f"socket owned by uid {uid}, not by the QEMU process's "
                               f"uid {owner}", socket=path,
                               hint="kscan only talks to sockets of the VM's own user")
        qmp = await QmpVm.connect(path)

        async def memory(name: str) -> tuple[list[RamRange], GuestMemory]:
            layout = await qmp.ram_layout(vm=name)
            return layout, GuestMemory(layout, name=name, owner=owner)

        try:
            async with qmp.deadline("attach", ATTACH_TIMEOUT if timeout is None else timeout):
                vm = await cls.on_monitor(qmp, memory)
                try:
                    vm.uuid = await qmp.query_uuid()
                except QmpError:
                    vm.uuid = None  # an old or odd QEMU: events simply carry no uuid
                return vm
        except BaseException:
            await qmp.close()
            raise

    @classmethod
    async def on_monitor(cls, qmp: QmpVm, memory: MemoryOpener,
                         name: str | None = None) -> AttachedVm:
        """Attach over an open monitor: its name (unless given), guest memory from
        `memory(name)`, the vCPUs. The monitor and memory are closed on any failure."""
        try:
            vm_name = name if name is not None else await qmp.name()
            layout, mem = await memory(vm_name)
            try:
                vcpus = await qmp.vcpus()
                if not vcpus:
                    raise VmStateError("QEMU reports no vCPUs", vm=vm_name)
            except BaseException:
                mem.close()
                raise
        except BaseException:
            await qmp.close()
            raise
        return cls(qmp, vm_name, layout, mem, vcpus)

    async def refresh_vcpus(self) -> list[VcpuState]:
        self.vcpus = await self.qmp.vcpus()
        if not self.vcpus:
            raise VmStateError("QEMU reports no vCPUs", vm=self.name)
        return self.vcpus

    async def run_state(self) -> RunState:
        return await self.qmp.run_state()

    def walker(self, vcpu: int = 0) -> PageWalker:
        return kernel_walker(self.mem, self.vcpus[vcpu])

    async def boot_profile(self) -> BootProfile:
        return await read_boot_profile(self.qmp, len(self.vcpus))

    def resets(self) -> int:
        return self.qmp.resets

    async def pause(self) -> None:
        await self.qmp.stop()

    async def progress(self) -> Sample | None:
        if self._threads is None:
            try:
                self._threads = await self.qmp.vcpu_threads()
            except QmpError:
                self._threads = []
        if not self._threads:
            return None
        got = sample_threads(self._threads)
        if got is None or len(got.run_s) != len(self.vcpus):
            self._threads = None  # vCPUs came or went, or QEMU restarted: ask again
        return got

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mem.close()
        await self.qmp.close()

    async def __aenter__(self) -> AttachedVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
