// Test-only: the verifier must refuse this (packet read without a bounds check),
// so the loader's error path and verifier-log capture can be tested.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_fine(struct xdp_md *ctx)
{
	return XDP_PASS;
}

SEC("xdp")
int xdp_unchecked_read(struct xdp_md *ctx)
{
	__u8 *p = (void *)(long)ctx->data;
	return p[20] == 1 ? XDP_DROP : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
