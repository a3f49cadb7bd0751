"""vm: a VM handle, live (QMP + mapped RAM) or replayed (recorded files), and its boot profile.

Layer 2 of the data path (see `scanner`): turns a source into a `VmHandle` whose memory
the page walker reads and whose registers and boot profile the checks use.
"""

from scanner.vm.bootprofile import BootProfile, pti_active, read_boot_profile
from scanner.vm.handle import VmHandle
from scanner.vm.identity import state_key
from scanner.vm.live import AttachedVm
from scanner.vm.replay import ReplayVm, write_replay
from scanner.vm.source import SourceKind, VmSource, open_vm

__all__ = ["AttachedVm", "BootProfile", "ReplayVm", "SourceKind", "VmHandle", "VmSource",
           "open_vm", "pti_active", "read_boot_profile", "state_key", "write_replay"]
