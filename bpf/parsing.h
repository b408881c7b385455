/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Header parsing for the balancer. Every access is preceded by an explicit bounds
 * check against data_end; anything we do not fully understand is reported with a
 * reason (an enum mlb_counter index) so the caller passes it to the stack unchanged.
 */
#ifndef MLB_PARSING_H
#define MLB_PARSING_H

#include "meshlb.h"

#define ETH_P_IP_BE     bpf_htons(0x0800)
#define ETH_P_IPV6_BE   bpf_htons(0x86DD)
#define ETH_P_8021Q_BE  bpf_htons(0x8100)
#define ETH_P_8021AD_BE bpf_htons(0x88A8)

#define MLB_IPPROTO_HOPOPTS  0
#define MLB_IPPROTO_ICMP     1
#define MLB_IPPROTO_TCP      6
#define MLB_IPPROTO_UDP      17
#define MLB_IPPROTO_ROUTING  43
#define MLB_IPPROTO_FRAGMENT 44
#define MLB_IPPROTO_ICMPV6   58
#define MLB_IPPROTO_DSTOPTS  60

/* Hop-by-hop and destination options are walked (they do not change which host
 * the packet is for); routing headers mean the destination is not final, so those
 * packets go to the stack. */
#define MLB_V6_MAX_EXT 3

#define MLB_TCP_FIN 0x01
#define MLB_TCP_SYN 0x02
#define MLB_TCP_RST 0x04
#define MLB_TCP_ACK 0x10

struct mlb_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

struct mlb_opt_hdr {
	__u8 nexthdr;
	__u8 hdrlen;   /* 8-octet units beyond the first 8 */
};

struct pkt {
	struct flow_key key;  /* as received: src = sender, dst = receiver; an ICMP
	                       * message has proto ICMP(V6) and ports 0 */
	struct ethhdr *eth;
	void *l3;
	void *l4;
	__u16 l3_len;         /* IPv4 tot_len / IPv6 40 + payload_len, host order */
	__u8 tcp_flags;
	__u8 marked;          /* carries the peer-forwarded mark */
	__u32 tcp_seq;        /* host order; salts the SNAT port of a new nat flow */
	__u8 df;              /* IPv4 DF (IPv6 is never fragmented on the way: 1) */
	__u8 icmp_type;
	__u8 l3_off;          /* bytes of Ethernet (and VLAN) header before l3 */
	__u8 pad;
};

/* ICMP and ICMPv6 share the first 8 bytes' shape. */
struct mlb_icmp_hdr {
	__u8 type;
	__u8 code;
	__u16 csum;
	__be32 rest;   /* unused, or the next-hop MTU (v4: low 16 bits; v6: all 32) */
};

#define MLB_IPV4_OPTS_MAX 40

/* One option of the walk below per call: bpf_loop() has the verifier check the step
 * once, where a loop over a variable position would be checked along every path. */
struct opt_walk {
	__u8 opts[64];  /* a power of two: "& 63" shows the verifier every index is inside */
	__u32 at;
	__u32 len;
	__u32 ok;
};

static long ipv4_option_step(__u64 n, void *data)
{
	struct opt_walk *w = data;
	__u32 at = w->at, len = w->len;

	if (at >= len) {
		w->ok = 1;
		return 1;
	}
	__u8 type = w->opts[at & 63];
	if (type == 0) {  /* end of the list */
		w->ok = 1;
		return 1;
	}
	if (type == 1) {  /* no operation */
		w->at = at + 1;
		return 0;
	}
	if (at + 1 >= len)
		return 1;
	__u8 olen = w->opts[(at + 1) & 63];
	if (olen < 2 || at + olen > len)
		return 1;
	w->at = at + olen;
	return 0;
}

/*
 * IPv4 options must lie inside the header: each is one byte (end of list, no-op) or
 * type, length >= 2 and its data, within IHL. A length running past the header
 * means the sender and the next parser disagree on where the transport header is.
 */
static __always_inline int ipv4_options_ok(struct xdp_md *ctx, __u32 off, __u32 len)
{
	struct opt_walk w;

	__builtin_memset(&w, 0, sizeof(w));
	if (len == 0 || len > MLB_IPV4_OPTS_MAX || bpf_xdp_load_bytes(ctx, off, w.opts, len))
		return 0;
	w.len = len;
	/* every step but the last moves on by a byte at least */
	bpf_loop(MLB_IPV4_OPTS_MAX + 1, ipv4_option_step, &w, 0);
	return w.ok;
}

static __always_inline int parse_l4(void *l4, void *l3_end, void *end, struct pkt *p, __u8 proto)
{
	if (proto == MLB_IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > end || (void *)(th + 1) > l3_end)
			return MLB_CNT_PASS_MALFORMED;
		if (th->doff < 5 || l4 + th->doff * 4 > l3_end)
			return MLB_CNT_PASS_MALFORMED;
		p->key.sport = th->source;
		p->key.dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_seq = bpf_ntohl(th->seq);
	} else if (proto == MLB_IPPROTO_UDP) {
		struct udphdr *uh = l4;
		if ((void *)(uh + 1) > end || (void *)(uh + 1) > l3_end)
			return MLB_CNT_PASS_MALFORMED;
		__u16 ulen = bpf_ntohs(uh->len);
		if (ulen < sizeof(*uh) || l4 + ulen > l3_end)
			return MLB_CNT_PASS_MALFORMED;
		p->key.sport = uh->source;
		p->key.dport = uh->dest;
	} else if (proto == MLB_IPPROTO_ICMP || proto == MLB_IPPROTO_ICMPV6) {
		struct mlb_icmp_hdr *ih = l4;
		if ((void *)(ih + 1) > end || (void *)(ih + 1) > l3_end)
			return MLB_CNT_PASS_MALFORMED;
		p->icmp_type = ih->type;
	} else {
		return MLB_CNT_PASS_UNKNOWN_L4;
	}
	p->key.proto = proto;
	p->l4 = l4;
	return 0;
}

static __always_inline int parse_ipv4(struct xdp_md *ctx, void *l3, void *end, struct pkt *p)
{
	struct iphdr *ip = l3;

	if ((void *)(ip + 1) > end)
		return MLB_CNT_PASS_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return MLB_CNT_PASS_BAD_IHL;
	__u32 hlen = ip->ihl * 4;
	__u16 tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen)
		return MLB_CNT_PASS_MALFORMED;
	/* The frame may carry Ethernet padding past tot_len, never less than it. */
	if (l3 + tot > end)
		return MLB_CNT_PASS_MALFORMED;
	if (ip->frag_off & bpf_htons(0x3fff))  /* MF or a non-zero offset */
		return MLB_CNT_PASS_FRAGMENT;
	if (hlen > sizeof(*ip) &&
	    !ipv4_options_ok(ctx, l3 + sizeof(*ip) - (void *)(long)ctx->data, hlen - sizeof(*ip)))
		return MLB_CNT_PASS_MALFORMED;
	p->df = !!(ip->frag_off & bpf_htons(0x4000));
	p->marked = !!(ip->frag_off & bpf_htons(MLB_V4_MARK));
	p->l3_len = tot;
	p->key.family = AF_INET;
	p->key.src[0] = ip->saddr;
	p->key.dst[0] = ip->daddr;
	return parse_l4(l3 + hlen, l3 + tot, end, p, ip->protocol);
}

static __always_inline int parse_ipv6(void *l3, void *end, struct pkt *p)
{
	struct ipv6hdr *ip6 = l3;

	if ((void *)(ip6 + 1) > end)
		return MLB_CNT_PASS_MALFORMED;
	if (ip6->version != 6)
		return MLB_CNT_PASS_BAD_IHL;
	__u16 plen = bpf_ntohs(ip6->payload_len);
	void *l3_end = (void *)(ip6 + 1) + plen;
	/* payload_len 0 is a jumbogram (hop-by-hop option): not ours. */
	if (plen == 0 || l3_end > end)
		return MLB_CNT_PASS_MALFORMED;

	__u8 nh = ip6->nexthdr;
	void *cur = ip6 + 1;
#pragma unroll
	for (int i = 0; i < MLB_V6_MAX_EXT; i++) {
		if (nh != MLB_IPPROTO_HOPOPTS && nh != MLB_IPPROTO_DSTOPTS)
			break;
		struct mlb_opt_hdr *oh = cur;
		if ((void *)(oh + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		nh = oh->nexthdr;
		cur += ((__u32)oh->hdrlen + 1) * 8;
	}
	if (nh == MLB_IPPROTO_FRAGMENT)
		return MLB_CNT_PASS_FRAGMENT;
	if (nh == MLB_IPPROTO_HOPOPTS || nh == MLB_IPPROTO_DSTOPTS || nh == MLB_IPPROTO_ROUTING)
		return MLB_CNT_PASS_V6_EXT;
	if (cur > l3_end)
		return MLB_CNT_PASS_MALFORMED;

	p->marked = (bpf_ntohl(*(__be32 *)ip6) & 0xfffff) == MLB_V6_MARK;
	p->df = 1;
	p->l3_len = 40 + plen;
	p->key.family = AF_INET6;
	__builtin_memcpy(p->key.src, &ip6->saddr, 16);
	__builtin_memcpy(p->key.dst, &ip6->daddr, 16);
	return parse_l4(cur, l3_end, end, p, nh);
}

/* 0 when p describes a TCP/UDP packet over IPv4/IPv6, else a reason counter. */
static __always_inline int parse_packet(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return MLB_CNT_PASS_MALFORMED;
	p->eth = eth;
	__be16 proto = eth->h_proto;
	void *l3 = eth + 1;
	if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE) {
		struct mlb_vlan_hdr *vh = l3;
		if ((void *)(vh + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		proto = vh->proto;
		l3 = vh + 1;
	}
	p->l3 = l3;
	p->l3_off = l3 - data;
	if (proto == ETH_P_IP_BE)
		return parse_ipv4(ctx, l3, end, p);
	if (proto == ETH_P_IPV6_BE)
		return parse_ipv6(l3, end, p);
	return MLB_CNT_PASS_NOT_IP;
}

#endif
