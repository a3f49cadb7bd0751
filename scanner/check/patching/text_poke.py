"""text_poke_bp() half-states (`scanner.check.patching`): an `int3` over a site of
another mechanism, caught half-way.

text_poke_bp() writes an `int3` first, then the tail, then the first byte: a site of
ftrace, jump_label, static_call (or an optprobe jmp) whose first byte is `int3` and
whose other bytes are the baseline's or those of an allowed form is verified as that
mechanism with `in_progress=True` — outside the kprobe blacklist, and only once: the
same half-state seen again HALF_STATE_MAX seconds later is tampering.

"""

from __future__ import annotations

from scanner.check.patch_state import HALF_STATE_MAX
from scanner.check.patching.common import (
    VerifierBase,
    _u64,
)


class TextPokeVerifier(VerifierBase):
    """text_poke_bp() half-states of any mechanism's site."""

    def half_state(self, key: str, live: bytes, what: str) -> str:
        """A text_poke_bp() half-state seen now: remembered for the next check; why it
        is not the kernel's if the same one was seen HALF_STATE_MAX seconds ago."""
        now = self.now
        if now is None:
            return ""
        hexb = live.hex()
        self.half_seen[key] = hexb
        old = self.memory.half.get(key)
        if old is not None and old[0] == hexb:
            self.half_first[key] = old[1]
            if now - old[1] >= HALF_STATE_MAX:
                return (f"{what}: text_poke_bp() half-state (int3) seen unchanged "
                        f"{now - old[1]:.1f} s apart (the kernel finishes one in "
                        "microseconds)")
        else:
            self.half_first[key] = now
        return ""


    def track_half_states(self) -> None:
        """text_poke_bp()'s half-states are transient and obey the kprobe blacklist
        (the kernel's int3 handler must be able to run there)."""
        for bt in self.batches:
            if not any(bt.in_progress):
                continue
            for o, ln, ip in zip(bt.off.tolist(), bt.length.tolist(), bt.in_progress,
                                 strict=True):
                if not ip:
                    continue
                va = self.base_s + o
                if self.blacklisted(va):
                    self.revoked.setdefault(o, (ln, f"{bt.mech}: text_poke_bp() half-state "
                                                    "(int3) in a function kprobes may not "
                                                    "touch (blacklist)"))
                    continue
                why = self.half_state(f"{_u64(va):#x}", bytes(self.lmem[o:o + ln]), bt.mech)
                if why:
                    self.revoked.setdefault(o, (ln, why))
