// SPDX-License-Identifier: GPL-2.0
/* kscan_sockfilter: load and free classic-BPF socket filters in a loop, in a
 * busybox-only test guest (raw syscalls, no libc). Each round opens a UDP socket,
 * attaches a filter of 2..33 instructions (SO_ATTACH_FILTER: the kernel JITs it into a
 * BPF prog pack, as it does every seccomp filter) and closes the socket (the program is
 * freed after an RCU grace period). So chunks of the pack are allocated, written and
 * freed all the time, as on a guest whose processes start with seccomp filters.
 * One line on stdout after the first filter, then one per 1000 rounds.
 *
 * Build: gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -Os */
#include <linux/filter.h>
#include <asm/unistd.h>

#define AF_INET 2
#define SOCK_DGRAM 2
#define SOL_SOCKET 1
#define SO_ATTACH_FILTER 26

static long sys5(long n, long a, long b, long c, long d, long e)
{
	long r;
	register long r10 asm("r10") = d;
	register long r8 asm("r8") = e;

	asm volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
		     : "rcx", "r11", "memory");
	return r;
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
	sys5(__NR_write, 1, (long)s, (long)len(s), 0, 0);
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

static struct sock_filter insns[34];

void cmain(void);
__attribute__((used)) void cmain(void)
{
	struct sock_fprog prog;
	long round, fd, rc;
	int i, n;

	for (round = 0;; round++) {
		n = 1 + (int)(round % 32);          /* programs of different sizes */
		for (i = 0; i < n; i++) {           /* A = i; ...; return 0xffff */
			insns[i].code = BPF_LD | BPF_IMM;
			insns[i].jt = 0;
			insns[i].jf = 0;
			insns[i].k = (unsigned int)(i + round);
		}
		insns[n].code = BPF_RET | BPF_K;
		insns[n].jt = 0;
		insns[n].jf = 0;
		insns[n].k = 0xffff;
		prog.len = (unsigned short)(n + 1);
		prog.filter = insns;
		fd = sys5(__NR_socket, AF_INET, SOCK_DGRAM, 0, 0, 0);
		if (fd < 0) {
			out("kscan_sockfilter: socket failed: ");
			num(fd);
			out("\n");
			sys5(__NR_exit, 1, 0, 0, 0, 0);
		}
		rc = sys5(__NR_setsockopt, fd, SOL_SOCKET, SO_ATTACH_FILTER, (long)&prog,
			  sizeof(prog));
		if (rc < 0) {
			out("kscan_sockfilter: SO_ATTACH_FILTER failed: ");
			num(rc);
			out("\n");
			sys5(__NR_exit, 1, 0, 0, 0, 0);
		}
		sys5(__NR_close, fd, 0, 0, 0, 0);
		if (round == 0)
			out("kscan_sockfilter: attached\n");
		if (round % 1000 == 999) {
			out("kscan_sockfilter: rounds ");
			num(round + 1);
			out("\n");
		}
	}
}

asm(".globl _start\n"
    "_start:\n"
    "	and $-16, %rsp\n"
    "	call cmain\n"
    "	hlt\n");
