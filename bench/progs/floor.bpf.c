/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reference programs for bench/bpf_bench.py, measured in the same run as the
 * balancer so the ratios do not depend on the machine:
 *   floor_ret     return XDP_TX
 *   floor_parse   parse eth/ipv4/tcp with bounds checks, swap MACs, XDP_TX
 *   floor_lookup  floor_parse + one hash lookup of the 5-tuple (meshlb's flow_key)
 *   bench_wrap    restores the packet headers and optionally varies the flow, then
 *                 tail-calls the program under test: BPF_PROG_TEST_RUN's repeat runs
 *                 iteration 2..N on iteration 1's output, which would send a
 *                 rewriting program down another path.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "meshlb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define WRAP_BYTES 64

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct flow_key);
	__type(value, __u64);
} floor_flows SEC(".maps");

struct wrap_cfg {
	__u8 pristine[WRAP_BYTES];
	__u32 nflows;  /* 0: same flow every iteration; else cycle through nflows */
	__u32 vary_seq;  /* 1: another TCP sequence number every iteration (a new SYN) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct wrap_cfg);
} wrap_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} wrap_iter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} wrap_target SEC(".maps");

SEC("xdp")
int floor_ret(struct xdp_md *ctx)
{
	return XDP_TX;
}

static __always_inline int parse(struct xdp_md *ctx, struct ethhdr **e, struct iphdr **i,
				 struct tcphdr **t)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(0x0800))
		return -1;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return -1;
	struct tcphdr *th = (void *)ip + ip->ihl * 4;
	if ((void *)(th + 1) > end || ip->protocol != 6)
		return -1;
	*e = eth;
	*i = ip;
	*t = th;
	return 0;
}

static __always_inline void swap_macs(struct ethhdr *eth)
{
	__u8 tmp[6];
	__builtin_memcpy(tmp, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, eth->h_dest, 6);
	__builtin_memcpy(eth->h_dest, tmp, 6);
}

SEC("xdp")
int floor_parse(struct xdp_md *ctx)
{
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *th;
	if (parse(ctx, &eth, &ip, &th))
		return XDP_PASS;
	swap_macs(eth);
	return XDP_TX;
}

SEC("xdp")
int floor_lookup(struct xdp_md *ctx)
{
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *th;
	struct flow_key k;
	if (parse(ctx, &eth, &ip, &th))
		return XDP_PASS;
	__builtin_memset(&k, 0, sizeof(k));
	k.src[0] = ip->saddr;
	k.dst[0] = ip->daddr;
	k.sport = th->source;
	k.dport = th->dest;
	k.proto = 6;
	k.family = AF_INET;
	if (!bpf_map_lookup_elem(&floor_flows, &k))
		return XDP_PASS;
	swap_macs(eth);
	return XDP_TX;
}

SEC("xdp")
int bench_wrap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct wrap_cfg *cfg = bpf_map_lookup_elem(&wrap_cfg, &zero);
	__u32 *it = bpf_map_lookup_elem(&wrap_iter, &zero);

	if (!cfg || !it || data + WRAP_BYTES > end)
		return XDP_ABORTED;
	__builtin_memcpy(data, cfg->pristine, WRAP_BYTES);
	if (cfg->nflows) {
		/* IPv4/TCP without VLAN: source address low 16 bits at 28, sport at 34 */
		__u32 i = *it;
		*it = i + 1 >= cfg->nflows ? 0 : i + 1;
		*(__u16 *)(data + 28) = (__u16)(i >> 16);
		*(__u16 *)(data + 34) = (__u16)i;
	}
	if (cfg->vary_seq) {
		/* IPv4/TCP without VLAN: the sequence number at 38 */
		__u32 i = *it;
		*it = i + 1;
		*(__u32 *)(data + 38) = i;
	}
	bpf_tail_call(ctx, &wrap_target, 0);
	return XDP_ABORTED;
}
