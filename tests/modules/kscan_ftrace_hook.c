// SPDX-License-Identifier: GPL-2.0
/* kscan_ftrace_hook: an ftrace IPMODIFY hook on __x64_sys_getdents64 from an unsigned
 * module. The hook calls the real getdents64, then removes every directory entry whose
 * name starts with "kscan_hide" (so `ls` no longer shows such files; opening them by
 * name still works). Unloadable (rmmod removes the hook). */
#include "kscan_testmod.h"
#include <linux/dirent.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#define PREFIX "kscan_hide"

static asmlinkage long hook_getdents64(const struct pt_regs *regs);

static struct kscan_hook hook = {
	.name = "__x64_sys_getdents64",
	.func = hook_getdents64,
};

static unsigned long hidden;
module_param(hidden, ulong, 0444);

static asmlinkage long hook_getdents64(const struct pt_regs *regs)
{
	struct linux_dirent64 __user *udir = (void __user *)regs->si;
	long ret = ((long (*)(const struct pt_regs *))hook.orig)(regs);
	char *buf;
	long off = 0, out = 0;

	if (ret <= 0)
		return ret;
	buf = kvmalloc(ret, GFP_KERNEL);
	if (!buf)
		return ret;
	if (copy_from_user(buf, udir, ret))
		goto done;
	while (off < ret) {
		struct linux_dirent64 *d = (void *)(buf + off);
		unsigned short len = d->d_reclen;

		if (len == 0 || off + len > ret)
			goto done;
		if (strncmp(d->d_name, PREFIX, sizeof(PREFIX) - 1)) {
			if (out != off)
				memmove(buf + out, d, len);
			out += len;
		} else {
			hidden++;
		}
		off += len;
	}
	if (!copy_to_user(udir, buf, out))
		ret = out;
done:
	kvfree(buf);
	return ret;
}

static int __init kscan_ftrace_hook_init(void)
{
	int err = kscan_hook_install(&hook);

	if (err) {
		pr_err("kscan_ftrace_hook: cannot hook %s: %d\n", hook.name, err);
		return err;
	}
	pr_info("kscan_ftrace_hook: hooked %s at %px -> %px (ops %px)\n", hook.name,
		(void *)hook.orig, hook.func, &hook.ops);
	return 0;
}

static void __exit kscan_ftrace_hook_exit(void)
{
	kscan_hook_remove(&hook);
	pr_info("kscan_ftrace_hook: unhooked\n");
}

module_init(kscan_ftrace_hook_init);
module_exit(kscan_ftrace_hook_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kscan test module: ftrace IPMODIFY hook hiding files");
