/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * meshlb XDP balancer: one fast path for every mix.
 *
 *   parse (eth, one 802.1Q tag, IPv4/IPv6, TCP/UDP) -- anything else --> PASS
 *     |                                            \-- ICMP --> meshlb_icmp (tail call)
 *     v
 *   dst address in vip_filter? -- no --> SNAT reply? -- yes --> back to client
 *     v                                              \-- no --> PASS (cheap)
 *   marked by a peer? -- yes --> (a VIP?) un-mark, PASS: never balanced twice
 *     v
 *   conntrack hit (not a new SYN, VIP same generation, backend usable)?
 *     | no: VIP lookup (miss -> PASS); a closed flow's late segment -> its old
 *     |     backend; else Maglev table of the VIP, conntrack insert (or rewrite)
 *     v
 *   backend LOCAL -> PASS (the VIP is on our loopback)
 *   send(): next hop (bpf_fib_lookup, cached per CPU), then
 *     dr  -> MACs, mark, TX/REDIRECT
 *     nat -> dst := backend, src := SNAT addr:port, checksums, TX/REDIRECT
 *     too big for the path -> meshlb_too_big (tail call): ICMP back to the sender
 *     no neighbour -> up to meshlb_neigh (tc) with the next hop, or DROP
 *     no route -> DROP: a packet of a remote backend never reaches the local stack
 *
 * Passed to the stack: IP fragments, IPv6 routing headers, stacked VLAN tags,
 * malformed headers, and everything not for a VIP.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "meshlb.h"
#include "parsing.h"
#include "csum.h"
#include "balancer_maps.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/*
 * The clock of conntrack and next-hop cache times: CLOCK_MONOTONIC nanoseconds at the
 * resolution of a jiffy (1 to 10 ms), which timeouts of seconds do not notice.
 * bpf_jiffies64() is a memory load the JIT inlines; bpf_ktime_get_coarse_ns() is a
 * helper call that cost 14 ns on every packet (docs/architecture.md). The scale and
 * offset are set at load by meshlb_clock_sync, so Python compares these times with
 * time.monotonic_ns(); the offset is one 64-bit word, so a resync is never half seen.
 */
extern unsigned int CONFIG_HZ __kconfig __weak;
__u64 clock_mult = 0;    /* (1e9 << MLB_CLOCK_SHIFT) / HZ */
__u64 clock_offset = 0;

static __always_inline __u64 mlb_now(void)
{
	return ((bpf_jiffies64() * clock_mult) >> MLB_CLOCK_SHIFT) + clock_offset;
}

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline void stats_add(void *map, __u32 id, __u64 bytes)
{
	struct lb_stats *s = bpf_map_lookup_elem(map, &id);
	if (s) {
		s->packets += 1;
		s->bytes += bytes;
	}
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/* Murmur3-style mixing over the 32-bit words of a flow_key (as laid out in
 * memory, native order); meshlb.dataplane.balancer.flow_hash mirrors it so Python
 * knows which Maglev slot a flow uses. IPv4 hashes only the words it uses. */
static __always_inline __u32 mix_word(__u32 h, __u32 w)
{
	w *= 0xcc9e2d51u;
	w = rotl32(w, 15);
	w *= 0x1b873593u;
	h ^= w;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64u;
}

static __always_inline __u32 flow_hash(const struct flow_key *k)
{
	const __u32 *w = (const __u32 *)k;
	__u32 h = MLB_HASH_SEED;

	h = mix_word(h, w[0]);
	if (k->family == AF_INET6) {
		h = mix_word(h, w[1]);
		h = mix_word(h, w[2]);
		h = mix_word(h, w[3]);
	}
	h = mix_word(h, w[4]);
	if (k->family == AF_INET6) {
		h = mix_word(h, w[5]);
		h = mix_word(h, w[6]);
		h = mix_word(h, w[7]);
	}
	h = mix_word(h, w[8]);  /* sport, dport */
	h = mix_word(h, w[9]);  /* proto, family */
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

static __always_inline int backend_usable(const struct backend *be)
{
	return be && (be->flags & (MLB_BE_F_VALID | MLB_BE_F_DOWN)) == MLB_BE_F_VALID;
}

/* A backend a flow of this family can go to: usable, and of the VIP's family, whatever
 * wrote the table (an IPv4 packet is never addressed to an IPv6 backend's first word). */
static __always_inline int backend_for(const struct backend *be, __u8 family)
{
	return backend_usable(be) && be->family == family;
}

static __always_inline __u32 addr_slot(const __u32 *a, __u8 family)
{
	__u32 x = a[0];
	if (family == AF_INET6)
		x ^= a[1] ^ a[2] ^ a[3];
	return (x * MLB_VIP_FILTER_MULT) >> MLB_VIP_FILTER_SHIFT;
}

/*
 * Every packet the balancer does not forward leaves through here, counted by its
 * reason (enum mlb_counter): the DROP_* reasons drop, every other one goes to the
 * stack unchanged.
 */
static __always_inline int verdict(__u32 reason)
{
	count(reason);
	if (reason >= MLB_CNT_DROP_FIRST && reason <= MLB_CNT_DROP_LAST)
		return XDP_DROP;
	return XDP_PASS;
}

#define MLB_ICMP4_QUOTE 548   /* RFC 1812 4.3.2.3: the whole error within 576 bytes */
#define MLB_ICMP6_QUOTE 1232  /* RFC 4443 2.4(c): the whole error within 1280 bytes */
#define MLB_ICMP_WORDS  ((8 + MLB_ICMP6_QUOTE) / 4)

/*
 * Tell the sender of the packet at l3_off that it does not fit the path on (mtu):
 * ICMP fragmentation-needed (IPv4) or packet-too-big (IPv6), from the address it was
 * sent to (the VIP, or the SNAT address of a nat reply), quoting as much of it as the
 * error may carry, sent back where it came from; the packet itself goes no further,
 * and its sender sends it again, smaller. The mix does what a router between the
 * client and the backend would: without it the packet went to the local stack,
 * where the VIP is local (dr) or the translated packet a martian (nat). Runs in the
 * program meshlb_too_big (below), reached by tail call.
 */
static __always_inline int answer_too_big(struct xdp_md *ctx, __u32 l3_off_arg, __u32 mtu,
					  __u32 v6)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	__u32 grow = v6 ? 48 : 28;
	__u32 from[4] = {}, to[4] = {};
	__u8 dmac[6], smac[6], tag[4];
	__u32 len = end - data, q;
	__u64 sum = 0;

	if (l3_off_arg != 14 && l3_off_arg != 18)
		return XDP_DROP;
	__u64 l3_off = l3_off_arg;
	asm volatile("%0 &= 31" : "+r"(l3_off));  /* a bound the verifier sees (it has no other) */
	struct ethhdr *eth = data;
	if (data + 58 > end)  /* too big for a path has at least 68 bytes of IP */
		return XDP_DROP;
	__builtin_memcpy(dmac, eth->h_source, 6);
	__builtin_memcpy(smac, eth->h_dest, 6);
	__builtin_memcpy(tag, data + 12, 4);  /* 802.1Q TPID and TCI, if tagged */
	if (!v6) {
		struct iphdr *ip = data + l3_off;
		if ((void *)(ip + 1) > end)
			return XDP_DROP;
		__u32 tot = bpf_ntohs(ip->tot_len);
		q = (tot < MLB_ICMP4_QUOTE ? tot : MLB_ICMP4_QUOTE) & ~3u;
		if (q < ip->ihl * 4 + 8)
			return XDP_DROP;
		from[0] = ip->daddr;
		to[0] = ip->saddr;
	} else {
		struct ipv6hdr *ip6 = data + l3_off;
		if ((void *)(ip6 + 1) > end)
			return XDP_DROP;
		__u32 tot = 40 + bpf_ntohs(ip6->payload_len);
		q = (tot < MLB_ICMP6_QUOTE ? tot : MLB_ICMP6_QUOTE) & ~3u;
		__builtin_memcpy(from, &ip6->daddr, 16);
		__builtin_memcpy(to, &ip6->saddr, 16);
	}
	if (l3_off + q > len || bpf_xdp_adjust_head(ctx, -(int)grow))
		return XDP_DROP;
	if (bpf_xdp_adjust_tail(ctx, (int)(l3_off + q) - (int)len))
		return XDP_DROP;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end || data + 18 > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	if (l3_off == 18) {
		__builtin_memcpy(data + 12, tag, 4);
		*(__be16 *)(data + 16) = v6 ? ETH_P_IPV6_BE : ETH_P_IP_BE;
	} else {
		eth->h_proto = v6 ? ETH_P_IPV6_BE : ETH_P_IP_BE;
	}
	struct mlb_icmp_hdr *ic;
	if (!v6) {
		struct iphdr *ip = data + l3_off;
		ic = (void *)(ip + 1);
		if ((void *)(ic + 1) > end)
			return XDP_DROP;
		*(__u8 *)ip = 0x45;
		ip->tos = 0xc0;  /* network control, as routers send their errors */
		ip->tot_len = bpf_htons(28 + q);
		ip->id = 0;
		ip->frag_off = 0;
		ip->ttl = 64;
		ip->protocol = MLB_IPPROTO_ICMP;
		ip->check = 0;
		ip->saddr = from[0];
		ip->daddr = to[0];
		__u32 *w = (void *)ip;
		__u64 hs = (__u64)w[0] + w[1] + w[2] + w[3] + w[4];
		ip->check = ~csum_fold64(hs);
		ic->type = 3;  /* destination unreachable */
		ic->code = 4;  /* fragmentation needed and DF set */
		ic->rest = bpf_htonl(mtu & 0xffff);
	} else {
		struct ipv6hdr *ip6 = data + l3_off;
		ic = (void *)(ip6 + 1);
		if ((void *)(ic + 1) > end)
			return XDP_DROP;
		*(__be32 *)ip6 = bpf_htonl(0x60000000);
		ip6->payload_len = bpf_htons(8 + q);
		ip6->nexthdr = MLB_IPPROTO_ICMPV6;
		ip6->hop_limit = 64;
		__builtin_memcpy(&ip6->saddr, from, 16);
		__builtin_memcpy(&ip6->daddr, to, 16);
		for (int i = 0; i < 4; i++)
			sum += (__u64)from[i] + to[i];
		sum += (__u64)bpf_htonl(8 + q) + bpf_htonl(MLB_IPPROTO_ICMPV6);  /* pseudo-header */
		ic->type = 2;  /* packet too big */
		ic->code = 0;
		ic->rest = bpf_htonl(mtu);
	}
	ic->csum = 0;
	__u32 words = (8 + q) / 4;
	for (__u32 i = 0; i < MLB_ICMP_WORDS; i++) {
		__u32 *x = (void *)ic + i * 4;
		if (i >= words)
			break;
		if ((void *)(x + 1) > end)
			return XDP_DROP;
		sum += *x;
	}
	ic->csum = ~csum_fold64(sum);
	count(MLB_CNT_ICMP_TOO_BIG);
	return XDP_TX;
}

/* Set (on) or clear the peer mark, fixing the IPv4 header checksum. */
static __always_inline void set_peer_mark(struct xdp_md *ctx, struct pkt *p, int on)
{
	void *end = (void *)(long)ctx->data_end;

	if (p->key.family == AF_INET) {
		struct iphdr *ip = p->l3;
		if ((void *)(ip + 1) > end)
			return;
		__u16 old = ip->frag_off;
		ip->frag_off = on ? old | bpf_htons(MLB_V4_MARK) : old & ~bpf_htons(MLB_V4_MARK);
		ip->check = csum_apply(ip->check, csum_diff16(0, old, ip->frag_off));
	} else {
		__be32 *w = p->l3;
		if ((void *)(w + 1) > end)
			return;
		*w = (*w & ~bpf_htonl(0xfffff)) | (on ? bpf_htonl(MLB_V6_MARK) : 0);
	}
}

static __always_inline int l2_send(struct xdp_md *ctx, struct pkt *p, const __u8 *dmac,
				   const __u8 *smac, __u32 ifindex, int do_mark)
{
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = p->eth;

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, dmac, 6);
	__builtin_memcpy(eth->h_source, smac, 6);
	if (do_mark)
		set_peer_mark(ctx, p, 1);
	if (ifindex == ctx->ingress_ifindex) {
		count(MLB_CNT_TX);
		return XDP_TX;
	}
	count(MLB_CNT_REDIRECT);
	return bpf_redirect(ifindex, 0);
}

/* The next hop towards a destination, as fib_resolve found it. */
struct hop {
	__u8 dmac[6];
	__u8 smac[6];
	__u32 ifindex;   /* egress (also on NO_NEIGH) */
	__u32 mtu;       /* on FRAG_NEEDED: the path's MTU */
	__u32 nh[4];     /* on NO_NEIGH: the next hop without a neighbour entry */
	__u32 nh_family;
};

/*
 * Successful next-hop lookups are cached per CPU by destination (fib_cache): the
 * answer depends on the destination and the ingress device only, as policy routing on
 * the source address is not honoured for cached results. The cached answer for this
 * packet towards dst, or NULL.
 */
static __always_inline struct fib_cache *fib_cached(struct xdp_md *ctx, const struct pkt *p,
						    const __u32 *dst, __u64 now)
{
	__u8 family = p->key.family;
	__u32 k = addr_slot(dst, family) & (MLB_FIB_CACHE_SLOTS - 1);
	struct fib_cache *fc = bpf_map_lookup_elem(&fib_cache, &k);

	if (fc && fc->expires_ns > now && fc->ingress_ifindex == ctx->ingress_ifindex &&
	    fc->family == family && p->l3_len <= fc->mtu &&
	    fc->addr[0] == dst[0] && fc->addr[1] == dst[1] && fc->addr[2] == dst[2] &&
	    fc->addr[3] == dst[3])
		return fc;
	return NULL;
}

/*
 * The next hop towards dst for this packet, looked up (and cached): SUCCESS with *h's
 * MACs and egress, or the lookup's failure (counted by code) with what it said. The
 * packet is not touched: a caller that translates it does so only once it knows the
 * packet can leave. Not inlined: its lookup structure would take room on the stack of
 * every path that sends.
 */
struct route {
	const __u32 *src;
	const __u32 *dst;
	__u64 now;
	struct hop h;    /* out */
};

static __noinline int fib_resolve(struct xdp_md *ctx, const struct pkt *p, struct route *rt)
{
	const __u32 *src = rt->src, *dst = rt->dst;
	__u64 now = rt->now;
	struct hop *h = &rt->h;
	struct bpf_fib_lookup f = {};
	__u8 family = p->key.family;
	__u32 k = addr_slot(dst, family) & (MLB_FIB_CACHE_SLOTS - 1);
	struct fib_cache *fc = bpf_map_lookup_elem(&fib_cache, &k);
	int rc;

	f.family = family;
	f.l4_protocol = p->key.proto;
	f.tot_len = p->l3_len;
	f.ifindex = ctx->ingress_ifindex;
	if (family == AF_INET) {
		f.ipv4_src = src[0];
		f.ipv4_dst = dst[0];
	} else {
		__builtin_memcpy(f.ipv6_src, src, 16);
		__builtin_memcpy(f.ipv6_dst, dst, 16);
	}
	rc = bpf_fib_lookup(ctx, &f, sizeof(f), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (fc) {
			__builtin_memcpy(fc->addr, dst, 16);
			fc->family = family;
			__builtin_memcpy(fc->dmac, f.dmac, 6);
			__builtin_memcpy(fc->smac, f.smac, 6);
			fc->ifindex = f.ifindex;
			fc->ingress_ifindex = ctx->ingress_ifindex;
			fc->mtu = f.mtu_result ? f.mtu_result : 1500;
			fc->expires_ns = now + MLB_FIB_CACHE_NS;
		}
		__builtin_memcpy(h->dmac, f.dmac, 6);
		__builtin_memcpy(h->smac, f.smac, 6);
		h->ifindex = f.ifindex;
		return rc;
	}
	if (rc > 0 && rc < MLB_FIB_RC_SLOTS)
		count(MLB_CNT_FIB_RC + rc);
	else
		count(MLB_CNT_FIB_RC);  /* slot 0 (SUCCESS) never counts: "negative/unknown" */
	h->ifindex = f.ifindex;
	h->mtu = f.mtu_result;
	/* on NO_NEIGH the lookup leaves the next hop in the destination (a gateway, or dst
	 * itself on a connected route), of the family it named (IPv4 via IPv6 exists) */
	h->nh_family = f.family;
	if (f.family == AF_INET) {
		h->nh[0] = f.ipv4_dst;
		h->nh[1] = h->nh[2] = h->nh[3] = 0;
	} else {
		__builtin_memcpy(h->nh, f.ipv6_dst, 16);
	}
	return rc;
}

/*
 * A next hop without a neighbour entry. The kernel resolves neighbours only for
 * packets it sends itself; from XDP a packet can reach it only through the stack, and
 * the stack would take a VIP packet as its own (the VIP is local) and a translated
 * one as a martian. So the packet, ready to leave (translated, marked), goes up with
 * its next hop in its metadata to the tc ingress program meshlb_neigh, which sends it
 * with bpf_redirect_neigh(): the kernel resolves the neighbour, holding the packet
 * meanwhile, as it does for its own. Without that program on the ingress device the
 * packet is dropped, never passed. Either way the next hop goes into neigh_missing,
 * for the agent to see.
 */
static __always_inline int hand_to_neigh(struct xdp_md *ctx, struct pkt *p,
					 const struct hop *h, __u64 now, int mark)
{
	struct neigh_key nk = {};
	struct neigh_seen *seen;
	__u32 in = ctx->ingress_ifindex;

	__builtin_memcpy(nk.addr, h->nh, 16);
	nk.ifindex = h->ifindex;
	nk.family = h->nh_family;
	seen = bpf_map_lookup_elem(&neigh_missing, &nk);
	if (seen) {
		seen->last_ns = now;
		seen->packets += 1;
	} else {
		struct neigh_seen ns = { .first_ns = now, .last_ns = now, .packets = 1 };
		bpf_map_update_elem(&neigh_missing, &nk, &ns, BPF_ANY);
	}
	/* a VLAN tag would be lost: bpf_redirect_neigh writes a plain Ethernet header */
	if (p->l3_off != sizeof(struct ethhdr) || !bpf_map_lookup_elem(&neigh_handoff, &in))
		return verdict(MLB_CNT_DROP_NO_NEIGH);
	if (mark)
		set_peer_mark(ctx, p, 1);
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct neigh_meta)))
		return verdict(MLB_CNT_DROP_NO_NEIGH);
	struct neigh_meta *m = (void *)(long)ctx->data_meta;
	if ((void *)(m + 1) > (void *)(long)ctx->data)
		return verdict(MLB_CNT_DROP_NO_NEIGH);
	m->magic = MLB_NEIGH_META_MAGIC;
	m->ifindex = h->ifindex;
	m->family = h->nh_family;
	__builtin_memcpy(m->nh, h->nh, 16);
	return verdict(MLB_CNT_PASS_NEIGH_RESOLVE);
}

/* A packet that cannot take the path fib_resolve found (rc, *h): too big for it, no
 * neighbour, no route. Nothing here goes to the local stack. */
static __always_inline int no_path(struct xdp_md *ctx, struct pkt *p, int rc,
				   const struct hop *h, int icmp)
{
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		/* IPv4 without DF would be fragmented on the way; XDP cannot, and an ICMP
		 * error is never answered with another */
		if (!p->df || icmp)
			return verdict(MLB_CNT_DROP_TOO_BIG);
		__u32 zero = 0;
		__u32 *mtu = bpf_map_lookup_elem(&too_big_mtu, &zero);
		if (mtu)
			*mtu = h->mtu;
		bpf_tail_call(ctx, &progs, MLB_PROG_TOO_BIG);
		return verdict(MLB_CNT_DROP_TOO_BIG);  /* the program is missing */
	}
	if (rc == BPF_FIB_LKUP_RET_BLACKHOLE || rc == BPF_FIB_LKUP_RET_UNREACHABLE ||
	    rc == BPF_FIB_LKUP_RET_PROHIBIT)
		return verdict(MLB_CNT_DROP_FIB);
	return verdict(MLB_CNT_DROP_FIB_OTHER);
}

/* How a packet leaves (send): the next hop is looked up from src to dst; translate:
 * its addresses and ports become src:sport -> dst:dport (nat); mark: the peer mark is
 * set (dr). One of these per program, filled by whichever path the packet took, and
 * one place that sends: every inlined copy of the sending code would take its own
 * room on a stack the verifier limits to 512 bytes. */
struct out {
	const __u32 *src;  /* addresses where they already are: the packet's key, a map value */
	const __u32 *dst;
	__u16 sport;   /* network order */
	__u16 dport;
	__u8 translate;
	__u8 mark;
	__u8 pad[2];
};

/*
 * Rewrite addresses/ports of the packet in place (to o's) and fix the IPv4 header and
 * TCP/UDP checksums incrementally (addresses are in the pseudo-header). Returns 0 or
 * a drop reason. IPv6 out of line: its checksum arithmetic spills a hundred bytes of
 * registers, which would go on the stack of every path.
 */
static __always_inline int rewrite_as(struct xdp_md *ctx, struct pkt *p, const struct out *o,
				      int v6)
{
	const __u32 *nsrc = o->src, *ndst = o->dst;
	__u16 nsport = o->sport, ndport = o->dport;
	void *end = (void *)(long)ctx->data_end;
	__u64 addr_diff = 0;
	__u16 *l4csum;
	__u16 *ports = p->l4;

	if ((void *)(ports + 2) > end)
		return MLB_CNT_PASS_MALFORMED;
	if (p->key.proto == MLB_IPPROTO_TCP) {
		struct tcphdr *th = p->l4;
		if ((void *)(th + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		l4csum = (__u16 *)&th->check;
	} else {
		struct udphdr *uh = p->l4;
		if ((void *)(uh + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		l4csum = (__u16 *)&uh->check;
		if (v6 && *l4csum == 0)
			return MLB_CNT_DROP_UDP6_ZERO_CSUM;
	}

	if (!v6) {
		struct iphdr *ip = p->l3;
		if ((void *)(ip + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		addr_diff = csum_diff32(addr_diff, ip->saddr, nsrc[0]);
		addr_diff = csum_diff32(addr_diff, ip->daddr, ndst[0]);
		ip->saddr = nsrc[0];
		ip->daddr = ndst[0];
		ip->check = csum_apply(ip->check, addr_diff);
	} else {
		struct ipv6hdr *ip6 = p->l3;
		if ((void *)(ip6 + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		addr_diff = csum_diff_addr(addr_diff, (__u32 *)&ip6->saddr, nsrc, 1);
		addr_diff = csum_diff_addr(addr_diff, (__u32 *)&ip6->daddr, ndst, 1);
		__builtin_memcpy(&ip6->saddr, nsrc, 16);
		__builtin_memcpy(&ip6->daddr, ndst, 16);
	}

	__u64 d = addr_diff;
	d = csum_diff16(d, ports[0], nsport);
	d = csum_diff16(d, ports[1], ndport);
	ports[0] = nsport;
	ports[1] = ndport;
	/* IPv4 UDP may carry no checksum (0): it stays 0. A computed 0 is sent as
	 * 0xffff, which is the same value in ones' complement. */
	if (p->key.proto == MLB_IPPROTO_UDP && *l4csum == 0)
		return 0;
	__u16 c = csum_apply(*l4csum, d);
	if (p->key.proto == MLB_IPPROTO_UDP && c == 0)
		c = 0xffff;
	*l4csum = c;
	return 0;
}

static __noinline int rewrite6(struct xdp_md *ctx, struct pkt *p, const struct out *o)
{
	return rewrite_as(ctx, p, o, 1);
}

static __always_inline int rewrite(struct xdp_md *ctx, struct pkt *p, const struct out *o)
{
	if (p->key.family == AF_INET6)
		return rewrite6(ctx, p, o);
	return rewrite_as(ctx, p, o, 0);
}

/* Results of the steps that choose where a packet goes, besides an XDP action. */
#define MLB_SEND    (-1)  /* it leaves as its struct out says */
#define MLB_NOT_VIP (-2)  /* not for a VIP: perhaps a nat reply */

/*
 * Send a packet as *o says. The next hop is found before anything changes: a packet
 * too big for the path is answered as its sender sent it (the ICMP error quotes it),
 * and a packet that cannot leave is dropped, never passed to the stack, where the VIP
 * is local (it would answer for another backend) and a translated packet a martian.
 * icmp: the packet is an ICMP error, never answered with another.
 */
static __always_inline int send(struct xdp_md *ctx, struct pkt *p, const struct out *o,
				__u64 now, int icmp)
{
	struct fib_cache *fc = fib_cached(ctx, p, o->dst, now);

	if (fc) {
		if (o->translate) {
			int r = rewrite(ctx, p, o);
			if (r)
				return verdict(r);
		}
		count(MLB_CNT_FIB_CACHED);
		return l2_send(ctx, p, fc->dmac, fc->smac, fc->ifindex, o->mark);
	}
	struct route rt;
	rt.src = o->src;
	rt.dst = o->dst;
	rt.now = now;
	int rc = fib_resolve(ctx, p, &rt);

	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return no_path(ctx, p, rc, &rt.h, icmp);
	if (o->translate) {
		int r = rewrite(ctx, p, o);
		if (r)
			return verdict(r);
	}
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return l2_send(ctx, p, rt.h.dmac, rt.h.smac, rt.h.ifindex, o->mark);
	return hand_to_neigh(ctx, p, &rt.h, now, o->mark);
}

static __always_inline struct snat_config *snat_for(__u8 family)
{
	__u32 idx = family == AF_INET ? 0 : 1;
	return bpf_map_lookup_elem(&snat_cfg, &idx);
}

static __always_inline void rev_key(struct flow_key *rk, const struct backend *be,
				    __u16 bport, const struct snat_config *sc, __u16 sport,
				    const struct flow_key *k)
{
	__builtin_memset(rk, 0, sizeof(*rk));
	__builtin_memcpy(rk->src, be->addr, 16);
	__builtin_memcpy(rk->dst, sc->addr, 16);
	rk->sport = bport;
	rk->dport = sport;
	rk->proto = k->proto;
	rk->family = k->family;
}

static __always_inline int flow_key_eq(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/*
 * Choose the SNAT source port of a new nat flow: deterministic from the flow hash,
 * a few alternatives on collision. The reverse entry is claimed with BPF_NOEXIST so
 * two CPUs cannot hand the same port to two flows. Returns the port (network order)
 * or 0 if every probe collided. Not inlined (its keys and probes would take room on
 * the stack of every path), hence its arguments in a structure.
 */
struct claim {
	const struct flow_key *k;
	const struct backend *be;
	const struct snat_config *sc;
	__u64 now;
	__u32 hash;
	__u32 backend_id;
	__u16 bport;
};

static __noinline __u16 snat_claim(const struct claim *c)
{
	const struct flow_key *k = c->k;
	const struct backend *be = c->be;
	const struct snat_config *sc = c->sc;
	__u64 now = c->now;
	__u32 hash = c->hash;
	__u16 bport = c->bport;
	__u32 span = (__u32)sc->port_hi - sc->port_lo + 1;
	struct nat_rev_value rv = {};
	struct flow_key rk;

	if (sc->port_hi < sc->port_lo)
		return 0;
	rv.orig = *k;
	rv.last_seen_ns = now;
	rv.backend_id = c->backend_id;
#pragma unroll
	for (int i = 0; i < MLB_SNAT_PROBES; i++) {
		__u16 port = bpf_htons((__u16)(sc->port_lo + (hash + i * 0x9e3779b1u) % span));
		rev_key(&rk, be, bport, sc, port, k);
		if (bpf_map_update_elem(&nat_reverse, &rk, &rv, BPF_NOEXIST) == 0)
			return port;
		/* Taken: by this very flow (its forward entry was evicted or re-selected
		 * to the same backend) is fine, by another flow is a collision. */
		struct nat_rev_value *cur = bpf_map_lookup_elem(&nat_reverse, &rk);
		if (cur && flow_key_eq(&cur->orig, k)) {
			cur->last_seen_ns = now;
			return port;
		}
	}
	return 0;
}

/* The VIP a flow is for (its destination address, port and protocol), or NULL. */
static __always_inline struct vip_meta *find_vip(const struct flow_key *k)
{
	struct vip_key vk;

	__builtin_memcpy(vk.addr, k->dst, 16);
	vk.port = k->dport;
	vk.proto = k->proto;
	vk.family = k->family;
	return bpf_map_lookup_elem(&vips, &vk);
}

/* The forward entry of a nat flow goes: its reverse entry goes with it, unless the
 * reply tuple was since claimed by another flow. */
static __always_inline void remove_reverse_of(const struct flow_key *k, const struct ct_value *v)
{
	__u32 bid = v->backend_id;
	struct backend *be = bpf_map_lookup_elem(&backends, &bid);
	struct snat_config *sc = snat_for(k->family);
	struct nat_rev_value *rv;
	struct flow_key rk;

	if (!be || !sc || !(be->flags & MLB_BE_F_VALID) || !(sc->flags & MLB_SNAT_F_VALID))
		return;
	rev_key(&rk, be, be->port ? be->port : k->dport, sc, v->snat_port, k);
	rv = bpf_map_lookup_elem(&nat_reverse, &rk);
	if (rv && flow_key_eq(&rv->orig, k))
		bpf_map_delete_elem(&nat_reverse, &rk);
}

/*
 * Remove a flow's conntrack entry (*ct, read before anything goes) with its nat
 * reverse entry. to_closed: the flow ended (its socket closed), so the entry moves to
 * ct_closed, where its late segments find their backend; otherwise nothing of it is
 * kept. Returns whether the conntrack entry was deleted here.
 */
static __always_inline int remove_flow(const struct flow_key *k, const struct ct_value *ct,
				       int to_closed)
{
	struct ct_value v = *ct;

	if (v.flags & MLB_CT_F_NAT)
		remove_reverse_of(k, &v);
	if (to_closed)
		bpf_map_update_elem(&ct_closed, k, &v, BPF_ANY);
	return bpf_map_delete_elem(&conntrack, k) == 0;
}

/* Reply from a nat backend to our SNAT address: back to VIP -> client. Otherwise the
 * packet is not ours at all. */
static __always_inline int nat_reply(struct xdp_md *ctx, struct pkt *p, struct out *o,
				     __u64 *now)
{
	struct snat_config *sc = snat_for(p->key.family);

	if (!sc || !(sc->flags & MLB_SNAT_F_VALID))
		return verdict(MLB_CNT_PASS_NOT_VIP);
	__u16 dport = bpf_ntohs(p->key.dport);
	if (dport < sc->port_lo || dport > sc->port_hi)
		return verdict(MLB_CNT_PASS_NOT_VIP);
	if (sc->addr[0] != p->key.dst[0] || sc->addr[1] != p->key.dst[1] ||
	    sc->addr[2] != p->key.dst[2] || sc->addr[3] != p->key.dst[3])
		return verdict(MLB_CNT_PASS_NOT_VIP);
	struct nat_rev_value *rv = bpf_map_lookup_elem(&nat_reverse, &p->key);
	if (!rv)
		return verdict(MLB_CNT_NAT_REPLY_MISS);
	*now = mlb_now();
	if (rv->last_seen_ns != *now)
		rv->last_seen_ns = *now;
	if (p->tcp_flags & (MLB_TCP_FIN | MLB_TCP_RST)) {
		/* the backend ends the flow (see conntrack_select) */
		struct ct_value *ct = bpf_map_lookup_elem(&conntrack, &rv->orig);
		if (ct && !(ct->flags & MLB_CT_F_CLOSING))
			ct->flags |= MLB_CT_F_CLOSING;
	}
	o->src = rv->orig.dst;
	o->dst = rv->orig.src;
	o->sport = rv->orig.dport;
	o->dport = rv->orig.sport;
	o->translate = 1;
	o->mark = 0;
	count(MLB_CNT_NAT_REPLY);
	stats_add(&backend_stats, rv->backend_id, ctx->data_end - ctx->data);
	return MLB_SEND;
}

/* A packet a peer balanced (it carries the mark): for this mix's own application. */
static __always_inline int from_peer(struct xdp_md *ctx, struct pkt *p, __u64 bytes)
{
	struct vip_meta *vip = find_vip(&p->key);

	if (!vip)
		return MLB_NOT_VIP;
	stats_add(&vip_stats, vip->vip_id, bytes);
	set_peer_mark(ctx, p, 0);
	/* This mix balances the flow to itself too (the router moved it): the peer that
	 * sent this holds an entry of it, so when the flow closes here the agent must
	 * tell the cluster, not only forget its own. */
	struct ct_value *own = bpf_map_lookup_elem(&conntrack, &p->key);
	if (own && !(own->flags & MLB_CT_F_PEER_SEEN))
		own->flags |= MLB_CT_F_PEER_SEEN;
	return verdict(MLB_CNT_PASS_FROM_PEER);
}

/* Where a packet of a VIP goes, as the conntrack or the VIP's table decided. */
struct dst {
	struct backend *be;
	__u32 backend_id;
	__u32 vip_id;
	__u32 nat;        /* the VIP's mode is nat */
	__u16 snat_port;  /* network order: the flow's SNAT port (nat, remote backend) */
	struct ct_value *stale;  /* the entry the table replaces (CT_STALE), rewritten in place */
};

/* What conntrack_select found for a packet's flow. */
enum ct_found {
	CT_NONE,    /* no entry */
	CT_STALE,   /* an entry the table must replace: its VIP or backend changed, or a
	             * SYN with another sequence number (a new connection on the tuple) */
	CT_FOLLOW,  /* the entry decides: *d is filled */
};

/*
 * Conntrack first: a hit needs neither the VIP hash lookup nor the table. The entry
 * is trusted only while its VIP exists in the same mode (gen), its backend is usable,
 * and for a SYN only if it is the flow's own SYN retransmitted (same sequence
 * number): a new connection on a reused tuple starts over on the table.
 */
static __always_inline int conntrack_select(const struct pkt *p, int syn, __u64 now,
					    struct dst *d)
{
	struct ct_value *ct = bpf_map_lookup_elem(&conntrack, &p->key);

	if (!ct)
		return CT_NONE;
	d->stale = ct;
	if (syn && ct->syn_seq != p->tcp_seq)
		return CT_STALE;
	__u32 vip_id = ct->vip_id;
	__u32 bid = ct->backend_id;
	struct vip_meta *vi = bpf_map_lookup_elem(&vip_info, &vip_id);
	struct backend *be = bpf_map_lookup_elem(&backends, &bid);
	if (!vi || !(vi->flags & MLB_VIP_F_ACTIVE) || vi->gen != ct->vip_gen ||
	    !backend_for(be, p->key.family))
		return CT_STALE;
	count(MLB_CNT_CT_HIT);
	if (ct->last_seen_ns != now)
		ct->last_seen_ns = now;
	/* A plain ACK (no SYN, no RST) can only come from a client whose handshake
	 * completed; a reset of the handshake does not count. */
	if (!(ct->flags & MLB_CT_F_ESTABLISHED) &&
	    (p->tcp_flags & (MLB_TCP_SYN | MLB_TCP_RST | MLB_TCP_ACK)) == MLB_TCP_ACK)
		ct->flags |= MLB_CT_F_ESTABLISHED;
	/* The client ends the flow: a real server's close reaches no tracer, so the
	 * agent expires the entry once it has gone quiet (MLB_CT_F_CLOSING). */
	if ((p->tcp_flags & (MLB_TCP_FIN | MLB_TCP_RST)) && !(ct->flags & MLB_CT_F_CLOSING))
		ct->flags |= MLB_CT_F_CLOSING;
	d->be = be;
	d->backend_id = bid;
	d->vip_id = vip_id;
	d->nat = vi->flags & MLB_VIP_F_NAT;
	d->snat_port = ct->snat_port;
	/* The client resets a handshake it gave up (its RST carries the SYN's sequence
	 * number + 1; a blind one would have to guess it). The backend drops its
	 * half-open request: no socket of the flow ever existed there, so no close will
	 * evict the entry. This is the flow's last packet: forwarded with what the entry
	 * said, the flow is forgotten. */
	if ((p->tcp_flags & MLB_TCP_RST) && ct->syn_seq && p->tcp_seq == ct->syn_seq + 1) {
		count(MLB_CNT_CT_HANDSHAKE_RESET);
		remove_flow(&p->key, ct, 0);
	}
	return CT_FOLLOW;
}

/*
 * A late segment of a flow that closed (its entry was evicted: the client's last ACK,
 * a window update, a retransmitted FIN): to the same backend as before, and nothing
 * is inserted, since no socket will close to evict it again. Returns whether it is
 * one.
 */
static __always_inline int closed_select(const struct pkt *p, const struct vip_meta *vip,
					 struct dst *d)
{
	struct ct_value *cl = bpf_map_lookup_elem(&ct_closed, &p->key);

	if (!cl || cl->vip_id != d->vip_id || cl->vip_gen != vip->gen)
		return 0;
	__u32 bid = cl->backend_id;
	struct backend *be = bpf_map_lookup_elem(&backends, &bid);
	if (!backend_for(be, p->key.family))
		return 0;
	count(MLB_CNT_CT_CLOSED_HIT);
	d->be = be;
	d->backend_id = bid;
	d->snat_port = cl->snat_port;
	return 1;
}

/*
 * Maglev: the backend in the flow's slot of tbl, a table of ring slots. The table is
 * the caller's choice (a VIP's current one today). Returns 0 with d->be set, or the
 * drop reason.
 */
static __always_inline int table_select(void *tbl, __u32 ring, __u32 hash, __u8 family,
					struct dst *d)
{
	if (!tbl || ring == 0)
		return MLB_CNT_DROP_NO_TABLE;
	__u32 slot = hash % ring;
	__u32 *b = bpf_map_lookup_elem(tbl, &slot);
	if (!b)
		return MLB_CNT_DROP_NO_TABLE;
	__u32 bid = *b;
	struct backend *be = bpf_map_lookup_elem(&backends, &bid);
	if (!backend_usable(be))
		return MLB_CNT_DROP_NO_BACKEND;
	if (be->family != family)
		return MLB_CNT_DROP_BACKEND_FAMILY;
	d->be = be;
	d->backend_id = bid;
	return 0;
}

/*
 * The flow's entry exists and the table chose for it again (a new connection on the
 * tuple, or its VIP or backend changed): the entry is rewritten where it is. An
 * update would take a free element from the LRU, link it, and free the old one: 60%
 * of the cost of such a SYN (docs/architecture.md). Another CPU reading the entry
 * meanwhile (a packet of the same tuple at the same instant) sees the old backend or
 * the new one, each the table's choice a moment apart; syn_seq goes last, so a copy
 * of the same SYN on another CPU follows the entry only once it is whole.
 */
static __always_inline void ct_rewrite(struct ct_value *ct, const struct ct_value *nv)
{
	ct->last_seen_ns = nv->last_seen_ns;
	ct->backend_id = nv->backend_id;
	ct->flags = nv->flags;
	ct->vip_id = nv->vip_id;
	ct->vip_gen = nv->vip_gen;
	ct->snat_port = nv->snat_port;
	asm volatile("" ::: "memory");
	ct->syn_seq = nv->syn_seq;
}

/*
 * A new flow on the backend its table chose: its SNAT port (nat to a remote
 * backend), then its conntrack entry. Returns 0, or the reason it goes no further.
 */
static __always_inline int flow_setup(const struct pkt *p, const struct vip_meta *vip, int syn,
				      __u32 hash, __u64 now, struct dst *d)
{
	struct backend *be = d->be;
	int tcp = p->key.proto == MLB_IPPROTO_TCP;
	struct ct_value nv = {};

	nv.last_seen_ns = now;
	nv.backend_id = d->backend_id;
	nv.vip_id = d->vip_id;
	nv.vip_gen = vip->gen;
	nv.syn_seq = syn ? p->tcp_seq : 0;
	/* UDP, or picked up mid-flow (it began elsewhere: another mix may hold it) */
	nv.flags = syn ? 0 : MLB_CT_F_ESTABLISHED | MLB_CT_F_PEER_SEEN;
	if (d->nat && !(be->flags & MLB_BE_F_LOCAL)) {
		/* A full-NAT TCP flow starts with a SYN; a later segment without its entry
		 * (evicted at close, or an agent-less restart) would get a fresh SNAT port
		 * the backend has never seen. The VIP is on lo, so the stack answers with a
		 * RST and the client learns at once. */
		if (tcp && !syn)
			return MLB_CNT_PASS_NAT_NO_FLOW;
		struct snat_config *sc = snat_for(p->key.family);
		if (!sc || !(sc->flags & MLB_SNAT_F_VALID))
			return MLB_CNT_DROP_NO_SNAT;
		/* A new connection on the tuple of a nat flow: the old one's reply translation
		 * goes first, or a late reply of its backend to the old SNAT port would still
		 * be turned into a packet to this client. */
		if (d->stale && (d->stale->flags & MLB_CT_F_NAT))
			remove_reverse_of(&p->key, d->stale);
		/* Salted with the SYN's sequence number: a client that reuses its port
		 * gets another SNAT port than the connection before, whose tuple the
		 * backend may still hold in TIME_WAIT and whose eviction may still be on
		 * its way. */
		struct claim c = {
			.k = &p->key, .be = be, .sc = sc, .now = now,
			.hash = hash ^ (p->tcp_seq * 0x9e3779b1u), .backend_id = d->backend_id,
			.bport = be->port ? be->port : p->key.dport,
		};
		d->snat_port = snat_claim(&c);
		if (!d->snat_port)
			return MLB_CNT_DROP_SNAT_EXHAUSTED;
		nv.flags |= MLB_CT_F_NAT;
		nv.snat_port = d->snat_port;
	} else if (tcp && (p->tcp_flags & (MLB_TCP_FIN | MLB_TCP_RST))) {
		/* The last packets of a flow whose entry was already evicted (its socket
		 * closed): routed by the table, but the entry does not come back to sit in
		 * the map until the LRU pushes it out. (A nat flow to a remote backend never
		 * gets here: see above.) */
		count(MLB_CNT_CT_SKIP_CLOSING);
		return 0;
	}
	if (d->stale) {
		ct_rewrite(d->stale, &nv);
		count(MLB_CNT_CT_INSERT);
	} else if (bpf_map_update_elem(&conntrack, &p->key, &nv, BPF_ANY) == 0) {
		count(MLB_CNT_CT_INSERT);
	} else {
		count(MLB_CNT_CT_INSERT_FAIL);
	}
	return 0;
}

/* How a packet of a VIP leaves for the backend chosen for it: MLB_SEND with *o, or a
 * verdict. */
static __always_inline int forward(struct pkt *p, const struct dst *d, struct out *o)
{
	struct backend *be = d->be;

	/* The VIP is on this node's loopback: the local app takes it as is (in nat mode
	 * too: a local backend needs no translation). */
	if (be->flags & MLB_BE_F_LOCAL)
		return verdict(MLB_CNT_PASS_LOCAL);
	o->dst = be->addr;
	if (!d->nat) {
		o->src = p->key.src;
		o->translate = 0;
		/* a real server is no mix: nothing there would take the mark off */
		o->mark = !(be->flags & MLB_BE_F_EXTERNAL);
		return MLB_SEND;
	}
	struct snat_config *sc = snat_for(p->key.family);
	if (!sc || !(sc->flags & MLB_SNAT_F_VALID))
		return verdict(MLB_CNT_DROP_NO_SNAT);
	o->src = sc->addr;
	o->sport = d->snat_port;
	o->dport = be->port ? be->port : p->key.dport;
	o->translate = 1;
	o->mark = 0;
	return MLB_SEND;
}

/* ICMP errors that concern a flow: destination unreachable (fragmentation needed
 * among them), time exceeded, parameter problem; ICMPv6 also packet too big. */
static __always_inline int icmp_is_error(const struct pkt *p)
{
	__u8 t = p->icmp_type;

	if (p->key.family == AF_INET)
		return t == 3 || t == 11 || t == 12;
	return t >= 1 && t <= 4;
}

/* Where an ICMP error's quoted packet starts (offsets from data) and its ports. */
struct quoted {
	__u32 l3;      /* the quoted IP header */
	__u32 l4;      /* its transport header */
	__u32 end;     /* the error's end (outer IP's) */
	__u16 bport;   /* nat: the backend's port and the flow's SNAT port (network order) */
	__u16 sport;
	__u8 proto;    /* the quoted packet's: TCP or UDP */
};

/*
 * The flow an ICMP error about a packet from a VIP is about, keyed as conntrack keys
 * it (client -> VIP): the quoted packet left from the VIP (a backend's reply in dr, a
 * translated reply in nat), so its source is the VIP's end and the error is addressed
 * to it. 0, or the reason it is not a VIP flow's.
 */
static __always_inline int icmp_flow(struct xdp_md *ctx, const struct pkt *p, struct flow_key *k,
				     struct quoted *q)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	void *l3_end = p->l3 + p->l3_len;
	void *in = p->l4 + sizeof(struct mlb_icmp_hdr);
	__u16 *ports;
	__u8 proto;

	if (l3_end > end)
		return MLB_CNT_PASS_MALFORMED;
	__builtin_memset(k, 0, sizeof(*k));
	if (p->key.family == AF_INET) {
		struct iphdr *ip = in;
		if ((void *)(ip + 1) > end || (void *)(ip + 1) > l3_end || ip->version != 4 ||
		    ip->ihl < 5)
			return MLB_CNT_PASS_MALFORMED;
		ports = in + ip->ihl * 4;
		if ((void *)(ports + 2) > end || (void *)(ports + 2) > l3_end)
			return MLB_CNT_PASS_MALFORMED;
		/* a later fragment carries no ports */
		if (ip->frag_off & bpf_htons(0x1fff) || ip->saddr != p->key.dst[0])
			return MLB_CNT_PASS_ICMP_NO_FLOW;
		proto = ip->protocol;
		k->src[0] = ip->daddr;
		k->dst[0] = ip->saddr;
	} else {
		struct ipv6hdr *ip6 = in;
		if ((void *)(ip6 + 1) > end || (void *)(ip6 + 1) > l3_end || ip6->version != 6)
			return MLB_CNT_PASS_MALFORMED;
		ports = (void *)(ip6 + 1);
		if ((void *)(ports + 2) > end || (void *)(ports + 2) > l3_end)
			return MLB_CNT_PASS_MALFORMED;
		proto = ip6->nexthdr;  /* extension headers: not a flow of ours */
		__builtin_memcpy(k->src, &ip6->daddr, 16);
		__builtin_memcpy(k->dst, &ip6->saddr, 16);
		if (k->dst[0] != p->key.dst[0] || k->dst[1] != p->key.dst[1] ||
		    k->dst[2] != p->key.dst[2] || k->dst[3] != p->key.dst[3])
			return MLB_CNT_PASS_ICMP_NO_FLOW;
	}
	if (proto != MLB_IPPROTO_TCP && proto != MLB_IPPROTO_UDP)
		return MLB_CNT_PASS_ICMP_NO_FLOW;
	k->sport = ports[1];
	k->dport = ports[0];
	k->proto = proto;
	k->family = p->key.family;
	q->l3 = in - data;
	q->l4 = (void *)ports - data;
	q->proto = proto;
	q->end = l3_end - data;
	return 0;
}

/*
 * Translate an ICMP error about a nat flow for its backend, who knows the flow as
 * (backend -> SNAT address:port): the error comes from the SNAT address to the backend,
 * quoting the packet as the backend sent it. Every checksum follows: the outer IPv4
 * header's, the quoted IPv4 header's and transport checksum (when quoted), and the
 * ICMP checksum over all of it (for ICMPv6 with its pseudo-header's addresses).
 * o: the SNAT address in src, the backend's in dst. Not inlined, for its stack.
 */
static __noinline int icmp_nat(struct xdp_md *ctx, struct pkt *p, const struct quoted *q,
			       const struct out *o)
{
	const __u32 *snat = o->src, *be = o->dst;
	__u16 bport = q->bport, sport = q->sport;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct mlb_icmp_hdr *ic = p->l4;
	__u64 icd = 0, inner = 0;
	__u16 *ports = data + (q->l4 & 0x1fff);

	if ((void *)(ic + 1) > end || (void *)(ports + 2) > end)
		return MLB_CNT_PASS_MALFORMED;
	__u16 ps = ports[0], pd = ports[1];
	ports[0] = bport;
	ports[1] = sport;
	__u64 portd = csum_diff16(csum_diff16(0, ps, bport), pd, sport);
	if (p->key.family == AF_INET) {
		struct iphdr *ip = p->l3, *iip = data + (q->l3 & 0x1fff);
		if ((void *)(ip + 1) > end || (void *)(iip + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		__u64 od = csum_diff32(csum_diff32(0, ip->saddr, snat[0]), ip->daddr, be[0]);
		ip->saddr = snat[0];
		ip->daddr = be[0];
		ip->check = csum_apply(ip->check, od);
		inner = csum_diff32(csum_diff32(0, iip->saddr, be[0]), iip->daddr, snat[0]);
		iip->saddr = be[0];
		iip->daddr = snat[0];
		__u16 oc = iip->check;
		iip->check = csum_apply(oc, inner);
		icd = csum_diff16(inner, oc, iip->check);
	} else {
		struct ipv6hdr *ip6 = p->l3, *iip = data + (q->l3 & 0x1fff);
		if ((void *)(ip6 + 1) > end || (void *)(iip + 1) > end)
			return MLB_CNT_PASS_MALFORMED;
		/* the helper sums 16-byte addresses without spilling a register per word;
		 * the outer pair is the pseudo-header's */
		icd = (__u32)bpf_csum_diff((__be32 *)&ip6->saddr, 16, (__be32 *)snat, 16, 0);
		icd = (__u32)bpf_csum_diff((__be32 *)&ip6->daddr, 16, (__be32 *)be, 16, icd);
		__builtin_memcpy(&ip6->saddr, snat, 16);
		__builtin_memcpy(&ip6->daddr, be, 16);
		inner = (__u32)bpf_csum_diff((__be32 *)&iip->saddr, 16, (__be32 *)be, 16, 0);
		inner = (__u32)bpf_csum_diff((__be32 *)&iip->daddr, 16, (__be32 *)snat, 16, inner);
		__builtin_memcpy(&iip->saddr, be, 16);
		__builtin_memcpy(&iip->daddr, snat, 16);
		icd += inner;
	}
	/* the quoted transport checksum, if the quote reaches it (TCP: 16 bytes in, UDP: 6;
	 * a UDP checksum of 0 means none) */
	__u16 *l4c = (void *)ports + (q->proto == MLB_IPPROTO_TCP ? 16 : 6);
	if ((void *)(l4c + 1) <= end && (void *)(l4c + 1) <= data + (q->end & 0x1fff) &&
	    (q->proto == MLB_IPPROTO_TCP || *l4c)) {
		__u16 old = *l4c;
		*l4c = csum_apply(old, inner + portd);
		icd = csum_diff16(icd, old, *l4c);
	}
	ic->csum = csum_apply(ic->csum, icd + portd);
	return 0;
}

/*
 * An ICMP error to a VIP about one of its flows, sent by a router on the way to the
 * client (the path is narrower, the client is gone): it concerns the connection's
 * socket, on the flow's backend, not this mix, which would consume it (the VIP is
 * local). It goes where the flow's packets go, found by the tuple it quotes (the
 * conntrack, else the VIP's table), marked in dr, translated in nat. Nothing about
 * the flow changes here: an error is not a packet of the flow.
 */
static __always_inline int icmp_packet(struct xdp_md *ctx, struct pkt *p)
{
	struct flow_key k;
	struct quoted q = {};
	struct dst d = {};
	int r;

	if (!icmp_is_error(p) ||
	    p->key.proto != (p->key.family == AF_INET ? MLB_IPPROTO_ICMP : MLB_IPPROTO_ICMPV6))
		return verdict(MLB_CNT_PASS_UNKNOWN_L4);
	__u32 fslot = addr_slot(p->key.dst, p->key.family);
	__u32 *maybe = bpf_map_lookup_elem(&vip_filter, &fslot);
	if (!maybe || !*maybe)
		return verdict(MLB_CNT_PASS_UNKNOWN_L4);
	if (p->marked) {
		set_peer_mark(ctx, p, 0);
		return verdict(MLB_CNT_PASS_FROM_PEER);
	}
	r = icmp_flow(ctx, p, &k, &q);
	if (r)
		return verdict(r);
	struct ct_value *ct = bpf_map_lookup_elem(&conntrack, &k);
	if (ct) {
		__u32 vid = ct->vip_id, bid = ct->backend_id;
		struct vip_meta *vi = bpf_map_lookup_elem(&vip_info, &vid);
		struct backend *be = bpf_map_lookup_elem(&backends, &bid);
		if (vi && (vi->flags & MLB_VIP_F_ACTIVE) && vi->gen == ct->vip_gen &&
		    backend_for(be, k.family)) {
			d.be = be;
			d.nat = vi->flags & MLB_VIP_F_NAT;
			d.snat_port = ct->snat_port;
		}
	}
	if (!d.be) {
		struct vip_meta *vip = find_vip(&k);
		if (!vip || (vip->flags & MLB_VIP_F_NAT))  /* nat: only its entry knows the port */
			return verdict(MLB_CNT_PASS_ICMP_NO_FLOW);
		__u32 vid = vip->vip_id;
		r = table_select(bpf_map_lookup_elem(&vip_tables, &vid), vip->ring_size,
				 flow_hash(&k), k.family, &d);
		if (r)
			return verdict(MLB_CNT_PASS_ICMP_NO_FLOW);
	}
	struct backend *be = d.be;
	if (!be)
		return XDP_DROP;  /* unreachable; keeps the verifier's view simple */
	count(MLB_CNT_ICMP_TO_BACKEND);
	if (be->flags & MLB_BE_F_LOCAL)
		return verdict(MLB_CNT_PASS_LOCAL);
	struct out o = {};
	o.dst = be->addr;
	if (!d.nat) {
		o.src = p->key.src;
		o.mark = 1;
	} else {
		struct snat_config *sc = snat_for(k.family);
		if (!sc || !(sc->flags & MLB_SNAT_F_VALID) || !d.snat_port)
			return verdict(MLB_CNT_PASS_ICMP_NO_FLOW);
		o.src = sc->addr;
		q.bport = be->port ? be->port : k.dport;
		q.sport = d.snat_port;
		r = icmp_nat(ctx, p, &q, &o);
		if (r)
			return verdict(r);
	}
	return send(ctx, p, &o, mlb_now(), 1);
}

/* Where a TCP/UDP packet goes: MLB_SEND with *o filled, MLB_NOT_VIP, or a verdict. */
static __always_inline int balance(struct xdp_md *ctx, struct pkt *p, struct out *o, __u64 *now)
{
	struct dst d;
	int r;

	/* Cheap exit for most traffic that is not for a VIP: one array slot. */
	__u32 fslot = addr_slot(p->key.dst, p->key.family);
	__u32 *maybe = bpf_map_lookup_elem(&vip_filter, &fslot);
	if (!maybe || !*maybe)
		return MLB_NOT_VIP;

	__u64 bytes = ctx->data_end - ctx->data;
	if (p->marked)
		return from_peer(ctx, p, bytes);

	int syn = p->key.proto == MLB_IPPROTO_TCP &&
		  (p->tcp_flags & (MLB_TCP_SYN | MLB_TCP_ACK)) == MLB_TCP_SYN;
	*now = mlb_now();
	d.be = NULL;
	d.snat_port = 0;
	d.stale = NULL;
	int found = conntrack_select(p, syn, *now, &d);

	r = 0;
	if (found != CT_FOLLOW) {
		struct vip_meta *vip = find_vip(&p->key);
		if (!vip)
			return MLB_NOT_VIP;  /* also the flows of a removed VIP */
		__u32 vip_id = vip->vip_id;

		count(found == CT_STALE ? MLB_CNT_CT_RESELECT : MLB_CNT_CT_MISS);
		d.vip_id = vip_id;
		d.nat = vip->flags & MLB_VIP_F_NAT;
		/* Only a segment that is not a SYN looks for a closed flow: a SYN with the
		 * closed one's sequence number is a copy of it that the network delayed past
		 * the close, rare enough to be balanced afresh (the backend answers it, the
		 * client resets the answer, and that reset, carrying the SYN's number + 1,
		 * removes the entry), while every new connection would pay a lookup that
		 * misses in a cold map: a fifth of a new SYN's cost. */
		if (found == CT_NONE && p->key.proto == MLB_IPPROTO_TCP && !syn &&
		    closed_select(p, vip, &d)) {
			r = 0;
		} else {
			__u32 hash = flow_hash(&p->key);
			r = table_select(bpf_map_lookup_elem(&vip_tables, &vip_id), vip->ring_size, hash,
					 p->key.family, &d);
			if (!r)
				r = flow_setup(p, vip, syn, hash, *now, &d);
		}
	}
	/* every packet of a VIP counts for it, forwarded or not */
	stats_add(&vip_stats, d.vip_id, bytes);
	if (r)
		return verdict(r);
	if (!d.be)
		return XDP_DROP;  /* unreachable; keeps the verifier's view simple */
	stats_add(&backend_stats, d.backend_id, bytes);
	return forward(p, &d, o);
}

SEC("xdp")
int meshlb_balancer(struct xdp_md *ctx)
{
	struct pkt p;
	struct out o;  /* every path that sends fills what send() reads */
	__u64 now = 0;
	int r;

	__builtin_memset(&p, 0, sizeof(p));
	count(MLB_CNT_RX);
	r = parse_packet(ctx, &p);
	if (r)
		return verdict(r);
	if (p.key.proto == MLB_IPPROTO_ICMP || p.key.proto == MLB_IPPROTO_ICMPV6) {
		bpf_tail_call(ctx, &progs, MLB_PROG_ICMP);
		return verdict(MLB_CNT_PASS_UNKNOWN_L4);  /* the program is missing */
	}
	r = balance(ctx, &p, &o, &now);
	if (r == MLB_NOT_VIP)
		r = nat_reply(ctx, &p, &o, &now);
	if (r != MLB_SEND)
		return r;
	return send(ctx, &p, &o, now, 0);
}

/* An ICMP message (meshlb_balancer tail-calls it for every one): see icmp_packet. */
SEC("xdp")
int meshlb_icmp(struct xdp_md *ctx)
{
	struct pkt p;

	__builtin_memset(&p, 0, sizeof(p));
	if (parse_packet(ctx, &p))
		return verdict(MLB_CNT_PASS_MALFORMED);  /* parsed once already: cannot be */
	return icmp_packet(ctx, &p);
}

/* A packet too big for the path to its next hop (too_big_mtu): see answer_too_big. */
SEC("xdp")
int meshlb_too_big(struct xdp_md *ctx)
{
	struct pkt p;
	__u32 zero = 0;
	__u32 *mtu = bpf_map_lookup_elem(&too_big_mtu, &zero);

	__builtin_memset(&p, 0, sizeof(p));
	if (!mtu || parse_packet(ctx, &p))
		return verdict(MLB_CNT_DROP_TOO_BIG);
	return answer_too_big(ctx, p.l3_off, *mtu, p.key.family == AF_INET6);
}

/*
 * tc ingress of the device XDP runs on: a packet XDP handed over for its next hop's
 * neighbour (hand_to_neigh; struct neigh_meta in its metadata) leaves by
 * bpf_redirect_neigh(), which resolves the neighbour and holds the packet meanwhile.
 * Every other packet goes on untouched.
 */
#define MLB_TC_ACT_OK 0

/* struct neigh_meta is only ever reached through a pointer: this keeps it in the
 * object's BTF, where the layout test compares it with the Python mirror. */
const struct neigh_meta *const neigh_meta_btf_anchor = 0;

SEC("tc")
int meshlb_neigh(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	struct neigh_meta *m = (void *)(long)skb->data_meta;
	struct bpf_redir_neigh nh = {};

	if ((void *)(m + 1) > data || m->magic != MLB_NEIGH_META_MAGIC)
		return MLB_TC_ACT_OK;
	nh.nh_family = m->family;
	if (m->family == AF_INET)
		nh.ipv4_nh = m->nh[0];
	else
		__builtin_memcpy(nh.ipv6_nh, m->nh, 16);
	count(MLB_CNT_NEIGH_SENT);
	return bpf_redirect_neigh(m->ifindex, &nh, sizeof(nh), 0);
}

/* ------------------------------------------------------------------------------
 * Batch eviction: the agent's side of the conntrack, one syscall per batch.
 *
 * A flow ends: its socket closed here, or a peer's eviction arrived. The agent
 * used to spend three to five map syscalls on each (lookup, move to ct_closed,
 * delete, the nat reverse entry), and a busy mix closes thousands of flows a
 * second on every member. Here the agent fills evict_batch through mmap and runs
 * this program once (BPF_PROG_TEST_RUN); meshlb/dataplane/balancer.py is its only
 * caller. The moves are those XDP expects: an evicted entry goes to ct_closed, so
 * a late segment still reaches its old backend without setting the flow up again.
 * The agent's expiry of entries no close removes (idle flows, handshakes nobody
 * finished) goes through here as well, so that one piece of code knows how a flow's
 * entries are found and removed.
 * ------------------------------------------------------------------------------ */

/* client -> VIP: move the conntrack entry to ct_closed; *out gets what it held. */
static __always_inline int evict_forward(const struct flow_key *k, struct ct_value *out)
{
	struct ct_value *ct = bpf_map_lookup_elem(&conntrack, k);

	if (!ct)
		return 0;
	*out = *ct;
	remove_flow(k, out, 1);
	return 1;
}

/* client -> VIP as an expiry scan saw it (*seen): removed with its nat reverse entry,
 * not into ct_closed (nothing of the flow ended: a retransmitted SYN is balanced
 * afresh), unless a packet touched it since the scan: its client may have just
 * spoken, and removing a nat flow then would reset it. */
static __always_inline int expire_forward(const struct flow_key *k, const struct ct_value *seen)
{
	struct ct_value *ct = bpf_map_lookup_elem(&conntrack, k);

	if (!ct || ct->last_seen_ns != seen->last_seen_ns || ct->flags != seen->flags)
		return 0;
	return remove_flow(k, ct, 0);
}

/* SNAT addr:port -> backend addr:port, a nat backend's closed socket: the reverse
 * entry is keyed by the reply (that tuple turned around). Its forward entry goes
 * too if it still has this SNAT port: the client may have reused its own port for
 * a new connection that got another. */
static __always_inline int evict_backend_side(const struct flow_key *k)
{
	struct nat_rev_value *rv;
	struct ct_value *ct;
	struct flow_key rk, orig;

	__builtin_memset(&rk, 0, sizeof(rk));
	__builtin_memcpy(rk.src, k->dst, 16);
	__builtin_memcpy(rk.dst, k->src, 16);
	rk.sport = k->dport;
	rk.dport = k->sport;
	rk.proto = k->proto;
	rk.family = k->family;
	rv = bpf_map_lookup_elem(&nat_reverse, &rk);
	if (!rv)
		return 0;
	orig = rv->orig;
	ct = bpf_map_lookup_elem(&conntrack, &orig);
	if (ct && ct->snat_port == rk.dport) {
		struct ct_value v = *ct;

		bpf_map_update_elem(&ct_closed, &orig, &v, BPF_ANY);
		bpf_map_delete_elem(&conntrack, &orig);
	}
	return bpf_map_delete_elem(&nat_reverse, &rk) == 0;
}

struct evict_run {
	__u32 removed;
};

static long evict_one(__u64 i, void *data)
{
	struct evict_run *run = data;
	__u32 zero = 0;
	struct evict_batch *b = bpf_map_lookup_elem(&evict_batch, &zero);
	struct evict_slot *s;
	struct flow_key k;
	__u32 op;

	if (!b || i >= MLB_EVICT_BATCH)
		return 1;
	s = &b->slots[i];
	k = s->key;
	op = s->op;
	s->result = MLB_EVICT_NONE;
	if (op == MLB_EVICT_OP_AUTO)
		op = find_vip(&k) ? MLB_EVICT_OP_FORWARD : MLB_EVICT_OP_BACKEND;
	if (op == MLB_EVICT_OP_FORWARD) {
		if (evict_forward(&k, &s->ct))
			s->result = MLB_EVICT_FORWARD;
	} else if (op == MLB_EVICT_OP_BACKEND) {
		if (evict_backend_side(&k))
			s->result = MLB_EVICT_BACKEND;
	} else if (op == MLB_EVICT_OP_EXPIRE) {
		if (expire_forward(&k, &s->ct))
			s->result = MLB_EVICT_EXPIRED;
	}
	if (s->result != MLB_EVICT_NONE)
		run->removed++;
	return 0;
}

/* Returns how many slots removed something; each slot's result says what. */
SEC("syscall")
int meshlb_evict(void *ctx)
{
	struct evict_run run = {};
	__u32 zero = 0;
	struct evict_batch *b = bpf_map_lookup_elem(&evict_batch, &zero);
	__u32 n;

	if (!b)
		return 0;
	n = b->count;
	if (n > MLB_EVICT_BATCH)
		n = MLB_EVICT_BATCH;
	bpf_loop(n, evict_one, &run, 0);
	return run.removed;
}

/*
 * Sets the clock of mlb_now() (struct clock_sync, meshlb.h): Balancer.load runs it
 * before the XDP program sees a packet, and the conntrack scans run it again, so
 * that the tick's rounding never adds up.
 */
SEC("syscall")
int meshlb_clock_sync(struct clock_sync *c)
{
	__u32 hz = c->hz ? c->hz : CONFIG_HZ;
	__u64 j = bpf_jiffies64();
	__u64 t = bpf_ktime_get_ns();

	c->jiffies = j;
	c->mono_ns = t;
	c->hz = hz;
	if (!hz)
		return 0;
	clock_mult = (1000000000ull << MLB_CLOCK_SHIFT) / hz;
	clock_offset = t - ((j * clock_mult) >> MLB_CLOCK_SHIFT);
	return hz;
}
