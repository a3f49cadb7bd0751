"""Errors raised by the scanner: QMP, VM state, kernel images and profiles.

Third-party errors (qemu.qmp, pyelftools, decompressors) are converted to these in one
place each (`scanner.qemu.qmp`, `scanner.image.kimage`/`scanner.image.vmlinux`), with
`raise ... from err`.
"""

from __future__ import annotations

from kscan.errors import KscanError


class QmpError(KscanError):
    """A QMP socket is missing, is not QMP, timed out, or a command failed."""

    def __init__(self, message: str, *, socket: str, command: str | None = None,
                 hint: str = "") -> None:
        self.socket = socket
        self.command = command
        where = f"{socket}" + (f" ({command})" if command else "")
        super().__init__(f"QMP {where}: {message}", hint=hint)


class VmStateError(KscanError):
    """The VM cannot be scanned as it is (no file-backed RAM, not booted, odd state)."""

    def __init__(self, message: str, *, vm: str, hint: str = "") -> None:
        self.vm = vm
        super().__init__(f"VM {vm}: {message}", hint=hint)


class BaselineMissing(VmStateError):
    """No golden baseline exists for the VM's kernel build and boot profile."""


class KernelImageError(KscanError):
    """A bzImage/vmlinuz/vmlinux cannot be read; names the file and the offset."""

    def __init__(self, message: str, *, path: str, offset: int | None = None,
                 hint: str = "") -> None:
        self.path = path
        self.offset = offset
        at = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"{path}{at}: {message}", hint=hint)


class CoreFileError(KscanError):
    """A memory image (`kscan check --core`) cannot be read; names the file and offset."""

    def __init__(self, message: str, *, path: str, offset: int | None = None,
                 hint: str = "") -> None:
        self.path = path
        self.offset = offset
        at = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"core {path}{at}: {message}", hint=hint)


class ProfileError(KscanError):
    """No stored kernel profile fits a VM, or its KASLR slide cannot be found."""

    def __init__(self, message: str, *, vm: str | None, version: str | None = None,
                 hint: str = "") -> None:
        self.vm = vm
        self.version = version
        super().__init__(f"VM {vm}: {message}" if vm else message, hint=hint)
