// Test-only XDP program exercising globals, hash/per-CPU/LRU maps, map-in-map
// and a ring buffer, all observable through BPF_PROG_TEST_RUN.
// The first packet byte selects what the run does (see mode_* below).
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

const volatile __u32 default_verdict = XDP_PASS;
const volatile __u64 stamp = 0;          /* if set, written into bytes 8..15 of each packet */
__u32 data_var = 7;                      /* .data */
__u64 runs = 0;                          /* .bss */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);                  /* packet length */
	__type(value, __u32);                /* verdict */
} verdicts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* 4-byte value: per-CPU slots are padded to 8 bytes by the kernel */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u32);
} pcpu_small SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u64);
} lru SEC(".maps");

struct inner_array {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct inner_array);
} outer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

struct event {
	__u32 len;
	__u32 seq;
	__u8 payload[8];
};

enum { mode_verdict = 0x01, mode_inner = 0xAA, mode_event = 0xEE };

SEC("xdp")
int xdp_probe(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data;
	__u32 zero = 0;
	__u8 *p = data;

	__u64 *cnt = bpf_map_lookup_elem(&counters, &zero);
	if (cnt)
		(*cnt)++;
	__sync_fetch_and_add(&runs, 1);

	if ((void *)(p + 16) > data_end)
		return default_verdict;
	if (stamp)
		*(__u64 *)(p + 8) = stamp;

	if (p[0] == mode_verdict) {
		__u32 *v = bpf_map_lookup_elem(&verdicts, &len);
		return v ? *v : default_verdict;
	}
	if (p[0] == mode_inner) {
		void *inner = bpf_map_lookup_elem(&outer, &zero);
		if (!inner)
			return XDP_ABORTED;
		__u32 *v = bpf_map_lookup_elem(inner, &zero);
		return v ? *v : XDP_ABORTED;
	}
	if (p[0] == mode_event) {
		struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (!e)
			return XDP_ABORTED;
		e->len = len;
		e->seq = data_var++;
		__builtin_memcpy(e->payload, p + 1, 7);
		e->payload[7] = 0;
		if (p[1] == 0xDD)  /* a record reserved, then withdrawn */
			bpf_ringbuf_discard(e, 0);
		else
			bpf_ringbuf_submit(e, 0);
		return XDP_PASS;
	}
	return default_verdict;
}

char LICENSE[] SEC("license") = "GPL";
