// SPDX-License-Identifier: GPL-2.0
/* kscan_fentry: attach a BPF fentry program in a busybox-only test guest, with the raw
 * bpf() syscall (no libc, no libbpf): BPF_PROG_LOAD of a BPF_PROG_TYPE_TRACING program
 * `r0 = 0; exit` (license GPL, name kscan_fentry), expected_attach_type
 * BPF_TRACE_FENTRY, attach_btf_id = argv[1] (the BTF id of the traced function in
 * vmlinux's BTF, computed by the test on the host); then BPF_RAW_TRACEPOINT_OPEN to
 * attach it, one line on stdout, and sleep holding the fds (kill it to detach).
 *
 * Build: gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -Os */
#include <linux/bpf.h>
#include <asm/unistd.h>

static long sys3(long n, long a, long b, long c)
{
	long r;

	asm volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
		     : "rcx", "r11", "memory");
	return r;
}

void *memset(void *d, int c, unsigned long n)
{
	volatile unsigned char *p = d;

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

static unsigned long len(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void out(const char *s)
{
	sys3(__NR_write, 1, (long)s, (long)len(s));
}

static void num(long v)
{
	char buf[24];
	int i = 23;

	buf[i] = 0;
	if (v < 0) {
		out("-");
		v = -v;
	}
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	out(buf + i);
}

static char log_buf[4096];

void cmain(long *sp);
__attribute__((used)) void cmain(long *sp)
{
	char **argv = (char **)(sp + 1);
	struct bpf_insn insns[2];
	union bpf_attr a;
	unsigned long id = 0;
	long prog, link;
	const char *p;

	if (sp[0] < 2) {
		out("usage: kscan_fentry BTF_ID\n");
		sys3(__NR_exit, 2, 0, 0);
	}
	for (p = argv[1]; *p >= '0' && *p <= '9'; p++)
		id = id * 10 + (unsigned long)(*p - '0');
	memset(insns, 0, sizeof(insns));
	insns[0].code = BPF_ALU64 | BPF_MOV | BPF_K;	/* r0 = 0 */
	insns[1].code = BPF_JMP | BPF_EXIT;
	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_TRACING;
	a.expected_attach_type = BPF_TRACE_FENTRY;
	a.insn_cnt = 2;
	a.insns = (unsigned long)insns;
	a.license = (unsigned long)"GPL";
	a.attach_btf_id = (unsigned int)id;
	a.log_buf = (unsigned long)log_buf;
	a.log_size = sizeof(log_buf);
	a.log_level = 1;
	{
		static const char name[] = "kscan_fentry";
		unsigned int i;

		for (i = 0; i < sizeof(name); i++)
			a.prog_name[i] = name[i];
	}
	prog = sys3(__NR_bpf, BPF_PROG_LOAD, (long)&a, sizeof(a));
	if (prog < 0) {
		out("kscan_fentry: BPF_PROG_LOAD failed: ");
		num(prog);
		out("\n");
		out(log_buf);
		sys3(__NR_exit, 1, 0, 0);
	}
	memset(&a, 0, sizeof(a));
	a.raw_tracepoint.name = 0;
	a.raw_tracepoint.prog_fd = (unsigned int)prog;
	link = sys3(__NR_bpf, BPF_RAW_TRACEPOINT_OPEN, (long)&a, sizeof(a));
	if (link < 0) {
		out("kscan_fentry: BPF_RAW_TRACEPOINT_OPEN failed: ");
		num(link);
		out("\n");
		sys3(__NR_exit, 1, 0, 0);
	}
	out("kscan_fentry: attached, prog fd ");
	num(prog);
	out(" link fd ");
	num(link);
	out("\n");
	for (;;)
		sys3(__NR_pause, 0, 0, 0);
}

asm(".globl _start\n"
    "_start:\n"
    "	mov %rsp, %rdi\n"
    "	and $-16, %rsp\n"
    "	call cmain\n"
    "	hlt\n");
