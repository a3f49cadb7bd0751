// SPDX-License-Identifier: GPL-2.0
/* kscan_benign: a plain module that does nothing but exist (listed, unsigned: sig_ok 0,
 * taints O and E). `kscan_benign_hits` is a function in its text for owner lookups. */
#include <linux/module.h>

static int calls;
module_param(calls, int, 0444);

noinline int kscan_benign_hits(void)
{
	return ++calls;
}

static int __init kscan_benign_init(void)
{
	pr_info("kscan_benign: loaded, text %px\n", kscan_benign_hits);
	kscan_benign_hits();
	return 0;
}

static void __exit kscan_benign_exit(void)
{
	pr_info("kscan_benign: unloaded\n");
}

module_init(kscan_benign_init);
module_exit(kscan_benign_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kscan test module: benign");
