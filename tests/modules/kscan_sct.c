// SPDX-License-Identifier: GPL-2.0
/* kscan_sct: points sys_call_table[nr] (default 110, getppid) at a function in this
 * module that calls the original. sys_call_table is in .rodata: the write goes through
 * a CR0.WP-off window (interrupts off), as old rootkits do. On kernels that dispatch
 * through x64_sys_call (6.1.90+, 6.9+) the table is no longer used for dispatch, so the
 * entry changes but behaviour does not; `calls` counts calls where it is used. Cannot
 * be unloaded (the entry stays). */
#include "kscan_testmod.h"
#include <asm/special_insns.h>
#include <linux/irqflags.h>

static uint nr = 110;
module_param(nr, uint, 0444);
static unsigned long calls;
module_param(calls, ulong, 0444);

typedef long (*sys_fn)(const struct pt_regs *);
static sys_fn original;

static long hooked(const struct pt_regs *regs)
{
	calls++;
	return original(regs);
}

static void poke(unsigned long *where, unsigned long value)
{
	unsigned long flags, cr0;

	local_irq_save(flags);
	cr0 = native_read_cr0();
	asm volatile("mov %0, %%cr0" : : "r"(cr0 & ~X86_CR0_WP) : "memory");
	WRITE_ONCE(*where, value);
	asm volatile("mov %0, %%cr0" : : "r"(cr0) : "memory");
	local_irq_restore(flags);
}

static int __init kscan_sct_init(void)
{
	unsigned long *table = (unsigned long *)kscan_lookup("sys_call_table");

	if (!table || nr >= 512)
		return -ENOENT;
	original = (sys_fn)table[nr];
	poke(&table[nr], (unsigned long)hooked);
	pr_info("kscan_sct: sys_call_table %px [%u]: %px -> %px\n", table, nr, original,
		(void *)table[nr]);
	return 0;
}

module_init(kscan_sct_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kscan test module: sys_call_table entry into a module");
