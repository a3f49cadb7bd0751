"""scanner: everything between a QEMU process and a verdict — and the `kscan` command.

The data path, step by step, and the sub-package that does each (imports point down
this list only; `tests/test_layers.py` keeps it so):

    QMP          qemu/      QMP transport, HMP text parsers, finding QEMU processes
    layout       vm/        a VM handle: RAM layout → read-only mapped guest memory,
                            vCPU registers, boot profile (live over QMP, or replayed)
    walk                    translate/ (below scanner): GVA → GPA page walk, PTI/PCID
    profile      image/     kernel image → profile (sections, relocs, build id, symbols)
    locate       check/     identify the kernel and its KASLR slide, translate regions
    read/normalize check/   read regions zero-copy; undo KASLR in a copy
    hash         hashing    keyed page and region hashes, fast digests (one definition)
    compare      check/     fast path (digests, page-table fingerprint), baselines,
                            page-by-page verify, localize and classify changes
    kernel data  check/kernel_lists/  the kernel's own lists (modules) read with the
                            struct layouts of its BTF (image/btf.py, image/layouts.py)
    examine      examine/   a VM handle + the database → an examined, verified VM
    event        run/       the engine: watchers, scheduler, events, actions
                 commands/  one-shot commands, inspect, the CLI

`check/` is pure (guest memory in, verdicts out; no QMP, no database). Errors for the
whole package are in `scanner.errors`.
"""
