// SPDX-License-Identifier: GPL-2.0
/* kscan_direct: an ftrace direct call from an unsigned module, the way BPF trampolines
 * attach (register_ftrace_direct: 6.1's ip API, 6.5+'s ops API): the ftrace site of `sym` (default
 * __x64_sys_sync) then calls `kscan_direct_tramp`, in this module's text, directly. The
 * trampoline counts calls (`hits`) and returns into the traced function. Unloadable. */
#include "kscan_testmod.h"
#include <linux/linkage.h>
#include <linux/version.h>
#include <asm/ibt.h>

static char *sym = "__x64_sys_sync";
module_param(sym, charp, 0444);
static unsigned long hits;
module_param(hits, ulong, 0444);

extern void kscan_direct_tramp(void);

asm(
"	.pushsection	.text, \"ax\", @progbits\n"
"	.type		kscan_direct_tramp, @function\n"
"	.globl		kscan_direct_tramp\n"
"kscan_direct_tramp:\n"
	ASM_ENDBR
"	lock incq	hits(%rip)\n"
	ASM_RET
"	.size		kscan_direct_tramp, .-kscan_direct_tramp\n"
"	.popsection\n"
);

static unsigned long ip;

#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
/* 6.5+: direct calls are registered through an ftrace_ops filtering the ip. */
static struct ftrace_ops direct_ops;

static int direct_register(void)
{
	int err = ftrace_set_filter_ip(&direct_ops, ip, 0, 0);

	return err ? err : register_ftrace_direct(&direct_ops,
						  (unsigned long)kscan_direct_tramp);
}

static void direct_unregister(void)
{
	unregister_ftrace_direct(&direct_ops, (unsigned long)kscan_direct_tramp, true);
}
#else
static int direct_register(void)
{
	return register_ftrace_direct(ip, (unsigned long)kscan_direct_tramp);
}

static void direct_unregister(void)
{
	unregister_ftrace_direct(ip, (unsigned long)kscan_direct_tramp);
}
#endif

static int __init kscan_direct_init(void)
{
	int err;

	ip = kscan_lookup(sym);
	if (!ip) {
		pr_err("kscan_direct: %s not found\n", sym);
		return -ENOENT;
	}
	err = direct_register();
	if (err) {
		pr_err("kscan_direct: register_ftrace_direct(%s) failed: %d\n", sym, err);
		return err;
	}
	pr_info("kscan_direct: direct call on %s at %px -> %px\n", sym, (void *)ip,
		kscan_direct_tramp);
	return 0;
}

static void __exit kscan_direct_exit(void)
{
	direct_unregister();
}

module_init(kscan_direct_init);
module_exit(kscan_direct_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kscan test: an ftrace direct call into an unsigned module");
