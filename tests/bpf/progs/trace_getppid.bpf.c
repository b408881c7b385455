// Test-only tp_btf program for auto-attach: counts getppid() calls made by
// one process (the test sets target_tgid), so other load on the machine
// cannot disturb the count.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

const volatile __u32 target_tgid = 0;
const volatile long target_syscall = 110; /* __NR_getppid on x86_64 */
__u64 hits = 0;

SEC("tp_btf/sys_enter")
int BPF_PROG(count_getppid, struct pt_regs *regs, long id)
{
	if ((bpf_get_current_pid_tgid() >> 32) != target_tgid || id != target_syscall)
		return 0;
	__sync_fetch_and_add(&hits, 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
