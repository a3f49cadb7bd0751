"""x86-64 architectural constants, defined once for all of kscan.

Control-register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1) and the page size.
Everything that tests a CR0/CR4/EFER bit or counts 4 KiB pages imports them from here.
"""

from __future__ import annotations

__all__ = ["CR0_PG", "CR0_WP", "CR4_LA57", "CR4_PAE", "CR4_SMAP", "CR4_SMEP", "EFER_LMA",
           "EFER_NXE", "PAGE"]

#: The base page size, and the unit kscan hashes and reports regions in.
PAGE = 4096

CR0_WP = 1 << 16  # supervisor writes honour read-only pages
CR0_PG = 1 << 31  # paging enabled
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12  # 5-level paging
CR4_SMEP = 1 << 20  # supervisor-mode execution prevention
CR4_SMAP = 1 << 21  # supervisor-mode access prevention
EFER_LMA = 1 << 10  # long mode active
EFER_NXE = 1 << 11  # no-execute bit honoured
