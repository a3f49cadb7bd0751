// SPDX-License-Identifier: GPL-2.0
/* kscan_kprobe: a kprobe whose pre_handler lives in this module. By default on
 * __x64_sys_sync at offset 0 (with KPROBES_ON_FTRACE that is an ftrace-based kprobe);
 * `sym=` and `off=` choose another place (a nonzero offset on an instruction boundary
 * gives an int3 or, once optimized, a jmp to an optprobe slot). `hits` counts calls. */
#include "kscan_testmod.h"

static char *sym = "__x64_sys_sync";
module_param(sym, charp, 0444);
static uint off;
module_param(off, uint, 0444);
static unsigned long hits;
module_param(hits, ulong, 0444);

static int pre(struct kprobe *p, struct pt_regs *regs)
{
	hits++;
	return 0;
}

static struct kprobe kp = { .pre_handler = pre };

static int __init kscan_kprobe_init(void)
{
	int err;

	kp.symbol_name = sym;
	kp.offset = off;
	err = register_kprobe(&kp);
	if (err) {
		pr_err("kscan_kprobe: cannot probe %s+%u: %d\n", sym, off, err);
		return err;
	}
	pr_info("kscan_kprobe: probe on %s+%u at %px, handler %px (kprobe %px)\n", sym, off,
		kp.addr, pre, &kp);
	return 0;
}

static void __exit kscan_kprobe_exit(void)
{
	unregister_kprobe(&kp);
	pr_info("kscan_kprobe: removed after %lu hits\n", hits);
}

module_init(kscan_kprobe_init);
module_exit(kscan_kprobe_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kscan test module: kprobe with a module handler");
