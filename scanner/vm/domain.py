"""A libvirt domain as a live VM: the monitor through libvirt, RAM of any backend kind.

`attach_domain(name, uri)` gives an `AttachedVm` (the same class `--qmp` gives) whose
`qmp` is a `LibvirtMonitor` (QMP passthrough; pause is virDomainSuspend) and whose
`mem` is a `HostMemory`: file-backed, hugepage and memfd RAM mapped read-only and
zero-copy (hugepage and memfd files are unlinked: mapped through /proc/PID/fd/N),
anonymous RAM copied from /proc/PID/mem (`translate.procmem`).
"""

from __future__ import annotations

from scanner.qemu.hostmem import process_layout
from scanner.qemu.libvirt_domain import DEFAULT_URI, LibvirtHost, LibvirtMonitor
from scanner.vm.live import AttachedVm
from translate import GuestMemory, RamRange
from translate.procmem import HostMemory

__all__ = ["attach_domain", "attach_monitor"]


async def attach_monitor(mon: LibvirtMonitor) -> AttachedVm:
    """Attach to the domain behind an open monitor (closed on failure)."""
    async def memory(name: str) -> tuple[list[RamRange], GuestMemory]:
        layout = await process_layout(mon, mon.pid(), vm=name)
        return layout, HostMemory(layout, name=name)

    vm = await AttachedVm.on_monitor(mon, memory, name=mon.domain)
    vm.uuid = mon.uuid
    return vm


async def attach_domain(name: str, uri: str = DEFAULT_URI,
                        host: LibvirtHost | None = None) -> AttachedVm:
    """Attach to a running domain by name (or UUID). Without `host`, a connection of its
    own is opened and closed with the VM."""
    own = host is None
    h = host if host is not None else await LibvirtHost.open(uri)
    try:
        mon = await h.monitor(name)
    except BaseException:
        if own:
            await h.close()
        raise
    mon.owns_host = own
    return await attach_monitor(mon)
