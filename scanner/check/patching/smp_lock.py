"""The smp-lock verifier (`scanner.check.patching`): `lock` prefixes.

`smp_lock` — a `.smp_locks` byte that is 0xf0 or 0x3e in both (alternative.c): all
sites alike, and 0x3e only on a one-vCPU VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from scanner.check.patching.common import (
    I64,
    U8,
    B,
    VerifierBase,
)


class SmpLockVerifier(VerifierBase):
    """`smp_lock` prefixes."""

    def do_smp_locks(self) -> None:
        """alternatives_smp_unlock() (alternative.c) turns every `lock` prefix into `ds`
        when the kernel boots with one CPU, and alternatives_smp_lock() all of them
        back when a second comes online: all sites are `lock` or all are `ds`, and
        `ds` only on a one-vCPU VM."""
        off = self.offsets(self.sites.smp_locks)
        off = off[(off >= 0) & (off < self.n)]
        base = self.b[off]
        off = off[(base == 0xF0) | (base == 0x3E)]
        lv = self.l[off]
        n_ds = int((lv == 0x3E).sum())
        n_lock = int((lv == 0xF0).sum())
        cpus = self.facts.cpus
        if cpus is not None and cpus > 1:
            bad_state, why = 0x3E, (f"smp lock site: `ds` in place of `lock` on a VM with "
                                    f"{cpus} vCPUs (only a one-CPU boot unlocks)")
        elif n_ds and n_lock:
            bad_state = 0x3E if n_ds <= n_lock else 0xF0
            why = (f"smp lock site: {n_ds} of {n_ds + n_lock} lock prefixes unlocked "
                   "(the kernel unlocks all or none)")
        else:
            bad_state, why = -1, ""

        def validate(live: U8, o: I64, aux: Mapping[str, npt.NDArray[Any]]
                     ) -> tuple[B, npt.NDArray[np.int8], I64]:
            v = live[:, 0]
            ok = ((v == 0xF0) | (v == 0x3E)) & (v != bad_state)
            return ok, np.where(v == 0xF0, 0, 1).astype(np.int8), np.zeros(o.size, np.int64)

        self.check_sites("smp_lock", off, 1, validate, ["lock", "ds"], b"",
                         reason=why or "smp lock site: not 0xf0/0x3e")
        if bad_state >= 0:   # the minority left as in the golden baseline: undone sites
            quiet = off[(lv == bad_state) & (lv == base)]
            for o in quiet[:10000].tolist():
                self.undone.append((o, 1, bytes((0xF0 if bad_state == 0x3E else 0x3E,)),
                                    why))
