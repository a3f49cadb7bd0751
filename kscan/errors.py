"""The root of kscan's error tree.

Every error kscan raises on purpose derives from `KscanError`. Each package defines its
own subclasses with typed fields (VM, address, level, file, offset) and builds the
message from them; `hint` says what the operator should do next. The CLI prints
`str(err)` on one line and exits 2, without a traceback.

    KscanError
    ├── translate.errors.TranslationError      guest address could not be resolved
    │   ├── PhysicalAddressError               GPA in a hole / beyond RAM
    │   └── PageFaultError                     page walk ended (not present, bad entry)
    ├── translate.errors.BackendError          memory-backend file cannot be mapped
    ├── scanner.errors.QmpError                QMP socket missing / not QMP / command failed
    ├── scanner.errors.VmStateError            VM not usable (no file-backed RAM, not booted)
    │   └── BaselineMissing                    no golden baseline for its kernel + CPU
    ├── scanner.errors.KernelImageError        bzImage/vmlinux cannot be read
    ├── scanner.errors.CoreFileError           a memory image (--core) cannot be read
    ├── scanner.errors.ProfileError            no profile matches / slide not found
    ├── store.errors.StoreError                database cannot be opened / migrated
    ├── store.errors.BundleError               a baseline bundle is refused (bad, unsigned)
    └── store.errors.KeyFileError              an Ed25519 key file cannot be used
"""

from __future__ import annotations


class KscanError(Exception):
    """Base of every error kscan raises deliberately."""

    #: One sentence telling the operator what to do about it (may be empty).
    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        self.message = message
        if hint:
            self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
