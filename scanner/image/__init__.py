"""image: a kernel image (bzImage/vmlinuz or vmlinux) → the profile kscan stores.

Payload extraction with every kernel compressor (`kimage`), the ELF's sections, build id
and KASLR relocations (`vmlinux`, `notes`, `relocs`), the kernel's own symbol table
recovered without a debug package (`kallsyms`), its self-patching sites (`patchsites`),
alternative-copied relocations (`altreloc`), the early IDT stubs (`early_idt`), and the
compact stored form (`kernel_profile`, `serialize`).
"""
