// SPDX-License-Identifier: GPL-2.0
/* kscan_exec_page: allocates a page in vmalloc space and makes it executable with
 * set_memory_x (not exported: found through kallsyms, as rootkits do; vmap() forces NX
 * since 5.8), copies a tiny payload there (endbr64; mov $0x4b53434e, %eax; ret), calls
 * it once to prove it runs, then unlinks itself from the module list (default), or with
 * vanish=1 fails its init so the kernel frees the module altogether and only the page
 * stays: executable kernel memory that no module owns. */
#include "kscan_testmod.h"
#include <linux/mm.h>
#include <linux/string.h>
#include <linux/vmalloc.h>

static int vanish;
module_param(vanish, int, 0444);

static const unsigned char payload[] = { 0xf3, 0x0f, 0x1e, 0xfa, 0xb8, 0x4e, 0x43, 0x53, 0x4b, 0xc3 };

static int __init kscan_exec_page_init(void)
{
	int (*set_x)(unsigned long addr, int numpages);
	void *va;
	unsigned int got;

	set_x = (void *)kscan_lookup("set_memory_x");
	if (!set_x)
		return -ENOENT;
	va = vmalloc(PAGE_SIZE);
	if (!va)
		return -ENOMEM;
	memset(va, 0xcc, PAGE_SIZE);
	memcpy(va, payload, sizeof(payload));
	if (set_x((unsigned long)va, 1)) {
		vfree(va);
		return -EPERM;
	}
	got = ((unsigned int (*)(void))va)();
	pr_info("kscan_exec_page: executable page at %px (phys %llx) returned %x\n", va,
		(unsigned long long)vmalloc_to_pfn(va) << PAGE_SHIFT, got);
	if (vanish) {
		pr_info("kscan_exec_page: failing init: the module goes, the page stays\n");
		return -EAGAIN;
	}
	list_del(&THIS_MODULE->list);
	pr_info("kscan_exec_page: unlinked from the module list\n");
	return 0;
}

module_init(kscan_exec_page_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kscan test module: an executable page no module owns");
