// SPDX-License-Identifier: GPL-2.0
/* kscan_hide: unlinks itself from the kernel's module list (list_del of
 * THIS_MODULE->list: lsmod and /proc/modules no longer show it; /sys/module/kscan_hide
 * stays), then hooks __x64_sys_newuname with an ftrace IPMODIFY hook that calls the
 * real one and replaces the nodename with "kscan-ghost" (`uname -n` shows it). Cannot
 * be unloaded. */
#include "kscan_testmod.h"
#include <linux/uaccess.h>
#include <linux/utsname.h>

static asmlinkage long hook_newuname(const struct pt_regs *regs);

static struct kscan_hook hook = {
	.name = "__x64_sys_newuname",
	.func = hook_newuname,
};

static asmlinkage long hook_newuname(const struct pt_regs *regs)
{
	struct new_utsname __user *name = (void __user *)regs->di;
	static const char ghost[] = "kscan-ghost";
	long ret = ((long (*)(const struct pt_regs *))hook.orig)(regs);

	if (ret == 0 && copy_to_user(name->nodename, ghost, sizeof(ghost)))
		ret = -EFAULT;
	return ret;
}

static int __init kscan_hide_init(void)
{
	int err;

	list_del(&THIS_MODULE->list);
	err = kscan_hook_install(&hook);
	pr_info("kscan_hide: unlinked from the module list; hook on %s at %px -> %px: %d\n",
		hook.name, (void *)hook.orig, hook.func, err);
	return 0;	/* even on failure: it is out of the list, it must never be freed */
}

module_init(kscan_hide_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kscan test module: hides from the module list, then hooks");
