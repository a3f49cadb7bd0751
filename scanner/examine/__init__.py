"""examine: a VM handle and the database in, a verdict out.

Layer 5 of the data path (see `scanner`): locate and read a VM's kernel (`reading`),
fetch what it is compared with (`baselines`), verify and record per-VM state
(`checking`). Shared by the one-shot commands and `kscan run`.
"""

from scanner.examine.baselines import (
    GoldenSet,
    golden_digest,
    golden_for,
    golden_regions,
    load_profiles,
)
from scanner.examine.checking import (
    check_examined,
    guest_reader,
    verify_and_record,
    verify_examined,
)
from scanner.examine.reading import (
    Examined,
    RunSync,
    Snapshot,
    examine,
    inline,
    reexamine,
    snapshot,
)

__all__ = ["Examined", "GoldenSet", "RunSync", "Snapshot", "check_examined", "examine",
           "golden_digest", "golden_for", "golden_regions", "guest_reader", "inline",
           "load_profiles", "reexamine", "snapshot", "verify_and_record", "verify_examined"]
