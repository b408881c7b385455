/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * meshlb XDP balancer: one fast path for every mix.
 *
 *   parse (eth, one 802.1Q tag, IPv4/IPv6, TCP/UDP) -- anything else --> PASS
 *     v
 *   dst address in vip_filter? -- no --> SNAT reply? -- yes --> back to client
 *     v                                              \-- no --> PASS (cheap)
 *   marked by a peer? -- yes --> (a VIP?) un-mark, PASS: never balanced twice
 *     v
 *   conntrack hit (not a SYN, VIP same generation, backend usable)?
 *     | no: VIP lookup (miss -> PASS); a closed flow's late segment -> its old
 *     |     backend; else Maglev table of the VIP, conntrack insert
 *     v
 *   backend LOCAL -> PASS (the VIP is on our loopback)
 *   dr  -> next hop MACs (bpf_fib_lookup, cached per CPU), mark, TX/REDIRECT
 *   nat -> dst := backend, src := SNAT addr:port, checksums, next hop, TX/REDIRECT
 *
 * Not handled here, passed to the stack: ICMP errors about VIP flows (so PMTU
 * signals reach only the mix that receives them), IP fragments, IPv6 routing
 * headers, stacked VLAN tags.
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

/*
 * Resolve next hop MACs towards dst and send. Only MACs change here; on failure
 * the packet is not dropped silently: every code is counted, a missing neighbour
 * goes to the stack (which resolves it for routed packets; the agent warms the
 * neighbour table for dr peers), the kernel's own "can be dropped" codes drop.
 * do_mark: set the peer mark, only once the packet is really leaving, so a packet
 * passed to our own stack is never seen marked. Successful lookups are cached per
 * CPU by destination (fib_cache): the answer depends on the destination and the
 * ingress device only, as policy routing on the source address is not honoured
 * for cached results.
 */
static __always_inline int fib_forward(struct xdp_md *ctx, struct pkt *p,
				       const __u32 *src, const __u32 *dst, int do_mark,
				       __u64 now)
{
	struct bpf_fib_lookup f = {};
	__u8 family = p->key.family;
	__u32 k = addr_slot(dst, family) & (MLB_FIB_CACHE_SLOTS - 1);
	struct fib_cache *fc = bpf_map_lookup_elem(&fib_cache, &k);
	int rc;

	if (fc && fc->expires_ns > now && fc->ingress_ifindex == ctx->ingress_ifindex &&
	    fc->family == family && p->l3_len <= fc->mtu &&
	    fc->addr[0] == dst[0] && fc->addr[1] == dst[1] && fc->addr[2] == dst[2] &&
	    fc->addr[3] == dst[3]) {
		count(MLB_CNT_FIB_CACHED);
		return l2_send(ctx, p, fc->dmac, fc->smac, fc->ifindex, do_mark);
	}
	f.family = p->key.family;
	f.l4_protocol = p->key.proto;
	f.tot_len = p->l3_len;
	f.ifindex = ctx->ingress_ifindex;
	if (p->key.family == AF_INET) {
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
		return l2_send(ctx, p, f.dmac, f.smac, f.ifindex, do_mark);
	}
	if (rc > 0 && rc < MLB_FIB_RC_SLOTS)
		count(MLB_CNT_FIB_RC + rc);
	else
		count(MLB_CNT_FIB_RC);  /* slot 0 (SUCCESS) never counts: "negative/unknown" */
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return verdict(MLB_CNT_PASS_NO_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_BLACKHOLE || rc == BPF_FIB_LKUP_RET_UNREACHABLE ||
	    rc == BPF_FIB_LKUP_RET_PROHIBIT)
		return verdict(MLB_CNT_DROP_FIB);
	return verdict(MLB_CNT_PASS_FIB_OTHER);
}

/*
 * Rewrite addresses/ports of the packet in place and fix the IPv4 header and
 * TCP/UDP checksums incrementally (addresses are in the pseudo-header).
 * Returns 0 or a drop reason.
 */
static __always_inline int rewrite(struct xdp_md *ctx, struct pkt *p,
				   const __u32 *nsrc, __u16 nsport,
				   const __u32 *ndst, __u16 ndport)
{
	void *end = (void *)(long)ctx->data_end;
	int v6 = p->key.family == AF_INET6;
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
 * or 0 if every probe collided.
 */
static __always_inline __u16 snat_claim(const struct flow_key *k, __u32 hash,
					const struct backend *be, __u16 bport,
					const struct snat_config *sc, __u32 backend_id, __u64 now)
{
	__u32 span = (__u32)sc->port_hi - sc->port_lo + 1;
	struct nat_rev_value rv = {};
	struct flow_key rk;

	if (sc->port_hi < sc->port_lo)
		return 0;
	rv.orig = *k;
	rv.last_seen_ns = now;
	rv.backend_id = backend_id;
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

/* Reply from a nat backend to our SNAT address: back to VIP -> client. */
static __always_inline int nat_reply(struct xdp_md *ctx, struct pkt *p)
{
	struct snat_config *sc = snat_for(p->key.family);

	if (!sc || !(sc->flags & MLB_SNAT_F_VALID))
		return -1;
	__u16 dport = bpf_ntohs(p->key.dport);
	if (dport < sc->port_lo || dport > sc->port_hi)
		return -1;
	if (sc->addr[0] != p->key.dst[0] || sc->addr[1] != p->key.dst[1] ||
	    sc->addr[2] != p->key.dst[2] || sc->addr[3] != p->key.dst[3])
		return -1;
	struct nat_rev_value *rv = bpf_map_lookup_elem(&nat_reverse, &p->key);
	if (!rv)
		return verdict(MLB_CNT_NAT_REPLY_MISS);
	__u64 now = mlb_now();
	if (rv->last_seen_ns != now)
		rv->last_seen_ns = now;
	struct flow_key orig = rv->orig;
	int r = rewrite(ctx, p, orig.dst, orig.dport, orig.src, orig.sport);
	if (r)
		return verdict(r);
	count(MLB_CNT_NAT_REPLY);
	stats_add(&backend_stats, rv->backend_id, ctx->data_end - ctx->data);
	return fib_forward(ctx, p, orig.dst, orig.src, 0, now);
}

static __always_inline int not_vip(struct xdp_md *ctx, struct pkt *p)
{
	int r = nat_reply(ctx, p);
	if (r >= 0)
		return r;
	return verdict(MLB_CNT_PASS_NOT_VIP);
}

/* A packet a peer balanced (it carries the mark): for this mix's own application. */
static __always_inline int from_peer(struct xdp_md *ctx, struct pkt *p, __u64 bytes)
{
	struct vip_meta *vip = find_vip(&p->key);

	if (!vip)
		return not_vip(ctx, p);
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
	if (!vi || !(vi->flags & MLB_VIP_F_ACTIVE) || vi->gen != ct->vip_gen || !backend_usable(be))
		return CT_STALE;
	count(MLB_CNT_CT_HIT);
	if (ct->last_seen_ns != now)
		ct->last_seen_ns = now;
	/* A plain ACK (no SYN, no RST) can only come from a client whose handshake
	 * completed; a reset of the handshake does not count. */
	if (!(ct->flags & MLB_CT_F_ESTABLISHED) &&
	    (p->tcp_flags & (MLB_TCP_SYN | MLB_TCP_RST | MLB_TCP_ACK)) == MLB_TCP_ACK)
		ct->flags |= MLB_CT_F_ESTABLISHED;
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
	if (!backend_usable(be))
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
static __always_inline int table_select(void *tbl, __u32 ring, __u32 hash, struct dst *d)
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
		__u16 bport = be->port ? be->port : p->key.dport;
		/* Salted with the SYN's sequence number: a client that reuses its port
		 * gets another SNAT port than the connection before, whose tuple the
		 * backend may still hold in TIME_WAIT and whose eviction may still be on
		 * its way. */
		d->snat_port = snat_claim(&p->key, hash ^ (p->tcp_seq * 0x9e3779b1u), be, bport, sc,
					  d->backend_id, now);
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

/* Send a packet of a VIP to the backend chosen for it. */
static __always_inline int forward(struct xdp_md *ctx, struct pkt *p, const struct dst *d,
				   __u64 now)
{
	struct backend *be = d->be;

	/* The VIP is on this node's loopback: the local app takes it as is (in nat mode
	 * too: a local backend needs no translation). */
	if (be->flags & MLB_BE_F_LOCAL)
		return verdict(MLB_CNT_PASS_LOCAL);
	if (!d->nat)
		return fib_forward(ctx, p, p->key.src, be->addr, 1, now);

	struct snat_config *sc = snat_for(p->key.family);
	if (!sc || !(sc->flags & MLB_SNAT_F_VALID))
		return verdict(MLB_CNT_DROP_NO_SNAT);
	__u32 saddr[4], daddr[4];
	__builtin_memcpy(saddr, sc->addr, 16);
	__builtin_memcpy(daddr, be->addr, 16);
	__u16 bport = be->port ? be->port : p->key.dport;
	int r = rewrite(ctx, p, saddr, d->snat_port, daddr, bport);
	if (r)
		return verdict(r);
	return fib_forward(ctx, p, saddr, daddr, 0, now);
}

SEC("xdp")
int meshlb_balancer(struct xdp_md *ctx)
{
	struct pkt p;
	struct dst d;
	int r;

	__builtin_memset(&p, 0, sizeof(p));
	count(MLB_CNT_RX);
	r = parse_packet(ctx, &p);
	if (r)
		return verdict(r);

	/* Cheap exit for most traffic that is not for a VIP: one array slot. */
	__u32 fslot = addr_slot(p.key.dst, p.key.family);
	__u32 *maybe = bpf_map_lookup_elem(&vip_filter, &fslot);
	if (!maybe || !*maybe)
		return not_vip(ctx, &p);

	__u64 bytes = ctx->data_end - ctx->data;
	if (p.marked)
		return from_peer(ctx, &p, bytes);

	int syn = p.key.proto == MLB_IPPROTO_TCP &&
		  (p.tcp_flags & (MLB_TCP_SYN | MLB_TCP_ACK)) == MLB_TCP_SYN;
	__u64 now = mlb_now();
	d.be = NULL;
	d.snat_port = 0;
	d.stale = NULL;
	int found = conntrack_select(&p, syn, now, &d);

	if (found != CT_FOLLOW) {
		struct vip_meta *vip = find_vip(&p.key);
		if (!vip)
			return not_vip(ctx, &p);  /* also the flows of a removed VIP */
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
		if (found == CT_NONE && p.key.proto == MLB_IPPROTO_TCP && !syn &&
		    closed_select(&p, vip, &d)) {
			r = 0;
		} else {
			__u32 hash = flow_hash(&p.key);
			r = table_select(bpf_map_lookup_elem(&vip_tables, &vip_id), vip->ring_size, hash,
					 &d);
			if (!r)
				r = flow_setup(&p, vip, syn, hash, now, &d);
		}
	}
	/* every packet of a VIP counts for it, forwarded or not */
	stats_add(&vip_stats, d.vip_id, bytes);
	if (r)
		return verdict(r);
	if (!d.be)
		return XDP_DROP;  /* unreachable; keeps the verifier's view simple */
	stats_add(&backend_stats, d.backend_id, bytes);
	return forward(ctx, &p, &d, now);
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
