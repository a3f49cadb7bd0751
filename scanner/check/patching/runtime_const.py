"""The runtime-constant verifier (`scanner.check.patching`): immediates written once,
at boot (6.11+).

`runtime_const` — the immediates of a runtime constant (6.11+, asm/runtime-const.h):
one value across its sites, equal to its variable in guest memory, to what the
kernel computes (USER_PTR_MAX), and to the value the first check of the boot saw.

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
    _s64,
)


class RuntimeConstVerifier(VerifierBase):
    """`runtime_const` immediates (6.11+)."""

    def do_runtime_consts(self) -> None:
        """Runtime constants (6.11+, asm/runtime-const.h): runtime_const_init() writes a
        variable's value into all its immediates once, at boot. All sites of a variable
        hold one value; it equals the variable in guest memory (where kallsyms names
        it), what the kernel computes (USER_PTR_MAX: TASK_SIZE_MAX for the VM's paging
        mode), and the value pinned at the first check of the boot."""
        groups: dict[tuple[str, int], list[int]] = {}
        for rc in self.sites.runtime_const:
            if 1 <= rc.size <= 8:
                groups.setdefault((rc.name, rc.size), []).append(_s64(rc.addr) - self.base_s)
        mem = self.memory
        pins: dict[str, int] = {}
        for (name, size), offs in sorted(groups.items()):
            o = np.array(offs, dtype=np.int64)
            o = o[(o >= 0) & (o + size <= self.n)]
            if o.size == 0:
                continue
            cols = o[:, None] + np.arange(size, dtype=np.int64)
            raw = np.zeros((o.size, 8), dtype=np.uint8)
            raw[:, :size] = self.l[cols]
            vals = np.unique(raw.view("<u8").reshape(-1))
            why = ""
            if vals.size > 1:
                why = (f"runtime constant {name}: its {o.size} sites hold {vals.size} "
                       "different values (the kernel writes one, at boot)")
            else:
                v = int(vals[0])
                why = self._runtime_const_value(name, size, v)
                was = mem.runtime_const.get(name)
                if was is None and mem.pinned:
                    # pinned without a value: the first check saw the golden bytes
                    b = np.zeros((o.size, 8), dtype=np.uint8)
                    b[:, :size] = self.b[cols]
                    bvals = np.unique(b.view("<u8").reshape(-1))
                    was = int(bvals[0]) if bvals.size == 1 else None
                if not why and was is not None and was != v:
                    why = (f"runtime constant {name}: {v:#x}, not the {was:#x} the first "
                           "check of this boot saw (written once, at boot)")
                if not why:
                    pins[name] = v

            def validate(live: U8, oo: I64, aux: Mapping[str, npt.NDArray[Any]],
                         ok: bool = not why) -> tuple[B, npt.NDArray[np.int8], I64]:
                return (np.full(oo.size, ok, dtype=np.bool_), np.zeros(oo.size, dtype=np.int8),
                        np.zeros(oo.size, dtype=np.int64))

            self.check_sites("runtime_const", o, size, validate, ["immediate"], b"",
                             reason=why)
        self.rc_now = dict(mem.runtime_const) if mem.pinned else pins

    def _runtime_const_value(self, name: str, size: int, v: int) -> str:
        """Why `v` cannot be the value of runtime constant `name` ("" when it can)."""
        la57 = self.facts.la57
        if name == "USER_PTR_MAX" and la57 is not None:
            # arch/x86/kernel/cpu/common.c: USER_PTR_MAX = TASK_SIZE_MAX, which is
            # (1 << __VIRTUAL_MASK_SHIFT) - PAGE_SIZE (47, or 56 with 5-level paging).
            want = (1 << (56 if la57 else 47)) - 4096
            if v != want:
                return (f"runtime constant USER_PTR_MAX: {v:#x}, not TASK_SIZE_MAX "
                        f"{want:#x} of {5 if la57 else 4}-level paging (every user-pointer "
                        "range check uses it)")
        var = self.named.get(name)
        if var is not None and self.read_va is not None:
            width = 8 if size == 8 else 4
            data = self.read(self.runtime(var), width)
            if data is None:
                return f"runtime constant {name}: its variable is unreadable"
            mv = int.from_bytes(data, "little")
            if mv != v:
                return (f"runtime constant {name}: {v:#x} in the code, {mv:#x} in the "
                        "variable (runtime_const_init copies the one into the other)")
        return ""
