/* Shared helpers of kscan's test modules (see README.md beside this file).
 *
 * These modules reproduce rootkit techniques in throw-away test guests so kscan's
 * attribution can be tested against the real thing. Never load them anywhere else. */
#ifndef KSCAN_TESTMOD_H
#define KSCAN_TESTMOD_H

#include <linux/ftrace.h>
#include <linux/kprobes.h>
#include <linux/module.h>

/* kallsyms_lookup_name is not exported since 5.7: find it the way rootkits do, by
 * registering a kprobe on it and reading back the address. */
static unsigned long __maybe_unused kscan_lookup(const char *name)
{
	static unsigned long (*lookup)(const char *name);
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };

	if (!lookup) {
		if (register_kprobe(&kp) < 0)
			return 0;
		lookup = (void *)kp.addr;
		unregister_kprobe(&kp);
	}
	return lookup(name);
}

/* An ftrace hook: an ftrace_ops with SAVE_REGS | RECURSION | IPMODIFY on one function
 * whose callback rewrites regs->ip to `func`, unless the call comes from this module
 * (that is how `func` calls the original through `orig`). */
struct kscan_hook {
	const char *name;
	void *func;
	unsigned long orig;
	struct ftrace_ops ops;
};

static void notrace kscan_hook_cb(unsigned long ip, unsigned long parent_ip,
				  struct ftrace_ops *ops, struct ftrace_regs *fregs)
{
	struct kscan_hook *h = container_of(ops, struct kscan_hook, ops);
	struct pt_regs *regs = ftrace_get_regs(fregs);

	if (regs && !within_module(parent_ip, THIS_MODULE))
		regs->ip = (unsigned long)h->func;
}

static int __maybe_unused kscan_hook_install(struct kscan_hook *h)
{
	int err;

	h->orig = kscan_lookup(h->name);
	if (!h->orig)
		return -ENOENT;
	h->ops.func = kscan_hook_cb;
	h->ops.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_RECURSION |
		       FTRACE_OPS_FL_IPMODIFY;
	err = ftrace_set_filter_ip(&h->ops, h->orig, 0, 0);
	if (err)
		return err;
	err = register_ftrace_function(&h->ops);
	if (err)
		ftrace_set_filter_ip(&h->ops, h->orig, 1, 0);
	return err;
}

static void __maybe_unused kscan_hook_remove(struct kscan_hook *h)
{
	unregister_ftrace_function(&h->ops);
	ftrace_set_filter_ip(&h->ops, h->orig, 1, 0);
}

#endif
