"""qemu: talking to QEMU — the QMP transport (`qmp`, on qemu.qmp), the HMP text parsers
(`hmp`: `info registers`, `info mtree -f`), and finding QEMU processes (`discover`).

The bottom layer of the scanner: everything above reads a VM through `scanner.vm`.
"""
