// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-release tracer.
 *
 * When a TCP socket whose local end is a watched endpoint (a VIP served here in dr
 * mode, a backend endpoint of this node in nat mode) reaches CLOSE, the agent must
 * evict the flow from conntrack here and gossip the eviction to the other mixes.
 * This program reports, except for the flows no other mix can hold, which it
 * evicts itself (see evict_local_only).
 *
 * Two hooks see the close: the inet_sock_set_state tracepoint (every socket) and,
 * where the agent attached it to a cgroup, a sock_ops program (sockets of watched
 * endpoints accepted since). The kernel does not run tracing programs for every
 * tracepoint hit (see meshlb_sock_ops); sock_ops callbacks it always runs.
 *
 * One kernel runs many agents in lab setups (one per netns) and every attached copy
 * of this program sees every socket of the machine, so each copy keeps only the
 * sockets of its own network namespace (tracer_cfg.netns_cookie, set at load).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "meshlb.h"
#include "tracer_maps.h"

const volatile struct tracer_config tracer_cfg = {};

/* Ring-buffer maps carry no value type, so without this the BTF of the object would
 * not describe the records it emits, and the layout test could not check the Python
 * mirror of struct sock_event against it. Lives in .rodata next to tracer_cfg. */
const struct sock_event *const sock_event_btf_anchor = 0;

static __always_inline void bump(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&tracer_stats, &idx);

	if (v)
		*v += 1;
}

static __always_inline bool v4_mapped(const __u32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/* The field changed from atomic64_t to u64 across kernel versions; both are
 * eight bytes, so a sized CO-RE read covers either. */
static __always_inline __u64 sock_netns_cookie(const struct sock *sk)
{
	struct net *net = BPF_CORE_READ(sk, __sk_common.skc_net.net);
	__u64 cookie = 0;

	if (net)
		bpf_core_read(&cookie, sizeof(cookie), &net->net_cookie);
	return cookie;
}

/*
 * Resets reported per CPU and 100 ms at most: stray segments sent at a VIP (a scan,
 * an ACK flood) are each answered with a reset, and must not each become an eviction
 * every member receives.
 */
#define RESET_BUDGET 256
#define RESET_WINDOW_NS 100000000ULL

static __always_inline bool take_reset_budget(void)
{
	__u32 zero = 0;
	struct reset_budget *b = bpf_map_lookup_elem(&reset_budget, &zero);
	__u64 now = bpf_ktime_get_ns();

	if (!b)
		return false;
	if (now - b->window_start >= RESET_WINDOW_NS) {
		b->window_start = now;
		b->used = 0;
	}
	if (b->used >= RESET_BUDGET)
		return false;
	b->used++;
	return true;
}

/*
 * A closed flow no other mix can hold: its entry here was set up by its SYN (the
 * router brought the flow here from its start), for this node's own backend, and no
 * packet of it ever came from a peer (the balancer marks that, and entries picked up
 * mid-flow, MLB_CT_F_PEER_SEEN). Nobody needs to hear of it, so it is evicted here,
 * as the agent would (into ct_closed, for late segments), and never reaches the agent:
 * in a cluster of N about 1/N of closes. nat entries are left to the agent, which
 * also owns their reverse entries.
 */
static __always_inline bool evict_local_only(const struct flow_key *k)
{
	struct ct_value *ct = bpf_map_lookup_elem(&conntrack, k);
	struct backend *be;
	struct ct_value v;
	__u32 bid;

	if (!ct || !ct->syn_seq || (ct->flags & (MLB_CT_F_PEER_SEEN | MLB_CT_F_NAT)))
		return false;
	bid = ct->backend_id;
	be = bpf_map_lookup_elem(&backends, &bid);
	if (!be || (be->flags & (MLB_BE_F_VALID | MLB_BE_F_LOCAL)) != (MLB_BE_F_VALID | MLB_BE_F_LOCAL))
		return false;
	v = *ct;
	bpf_map_update_elem(&ct_closed, k, &v, BPF_ANY);
	/* a map busy on this CPU (this program interrupted an update of it) refuses:
	 * then the close is reported and the agent evicts it */
	return bpf_map_delete_elem(&conntrack, k) == 0;
}

/* A flow of a watched endpoint ended (or was refused): one ring-buffer record. */
static __always_inline int emit(__u64 cookie, const struct endpoint_key *local,
				const __u32 raddr[4], __u16 rport, int oldstate, __u32 stat,
				bool vip_only)
{
	struct sock_event *ev;
	struct flow_key key = {};

	if (!rport)
		return 0;
	struct endpoint_filter *filter = bpf_map_lookup_elem(&watched_endpoints, local);
	if (!filter)
		return 0;
	/* a remote-port filter marks a nat endpoint (see meshlb_reset_sent) */
	if (vip_only && filter->rport_hi)
		return 0;
	if (filter->rport_hi) {
		__u16 rp = bpf_ntohs(rport);
		if (rp < filter->rport_lo || rp > filter->rport_hi)
			return 0;
	}
	if (stat == MLB_TRACER_STAT_RESET && !take_reset_budget()) {
		bump(MLB_TRACER_STAT_RESET_LIMITED);
		return 0;
	}
	__builtin_memcpy(key.src, raddr, 16);
	__builtin_memcpy(key.dst, local->addr, 16);
	key.sport = rport;
	key.dport = local->port;
	key.proto = IPPROTO_TCP;
	key.family = local->family;
	/* a refused flow is always reported: its reset is news to the mix that sent it */
	if (stat != MLB_TRACER_STAT_RESET && evict_local_only(&key)) {
		bump(MLB_TRACER_STAT_LOCAL_EVICTED);
	} else {
		ev = bpf_ringbuf_reserve(&sock_events, sizeof(*ev), 0);
		if (!ev) {
			bump(MLB_TRACER_STAT_RINGBUF_FULL);
			return 0;
		}
		ev->key = key;
		ev->netns_cookie = cookie;
		ev->timestamp_ns = bpf_ktime_get_ns();
		ev->oldstate = oldstate;
		ev->pad = 0;
		bpf_ringbuf_submit(ev, 0);
		bump(MLB_TRACER_STAT_EMITTED);
	}
	/* which hook handled it: the backup, the reset hook or sock_ops */
	if (stat != MLB_TRACER_STAT_EMITTED)
		bump(stat);
	return 0;
}

/* A dual-stack socket serving an IPv4 client: the balancer and the watch list know
 * that flow as IPv4. */
static __always_inline void unmap_v4(struct endpoint_key *local, __u32 raddr[4])
{
	if (local->family != AF_INET6 || !v4_mapped(local->addr))
		return;
	local->addr[0] = local->addr[3];
	local->addr[1] = local->addr[2] = local->addr[3] = 0;
	raddr[0] = raddr[3];
	raddr[1] = raddr[2] = raddr[3] = 0;
	local->family = AF_INET;
}

static __always_inline bool closed_by_sockops(const struct sock *sk)
{
	__u32 zero = 0;
	__u64 *last = bpf_map_lookup_elem(&sockops_closed, &zero);
	__u64 cookie = 0;

	if (!last || !*last)
		return false;
	/* atomic64_t or u64 across kernel versions: eight bytes either way */
	bpf_core_read(&cookie, sizeof(cookie), &sk->__sk_common.skc_cookie);
	return cookie == *last;
}

static __always_inline int report_close(const struct sock *sk, int oldstate, __u32 stat)
{
	struct endpoint_key local = {};
	__u32 raddr[4] = {};
	__u16 family, rport;
	__u64 cookie;

	/* A listener closing has no peer: nothing to evict. */
	if (oldstate == TCP_LISTEN)
		return 0;
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	if (closed_by_sockops(sk))
		return 0;

	cookie = sock_netns_cookie(sk);
	if (tracer_cfg.netns_cookie && cookie != tracer_cfg.netns_cookie)
		return 0;

	family = BPF_CORE_READ(sk, __sk_common.skc_family);
	if (family == AF_INET) {
		local.addr[0] = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		raddr[0] = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		local.family = AF_INET;
	} else if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&local.addr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr32);
		BPF_CORE_READ_INTO(&raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr32);
		local.family = AF_INET6;
		unmap_v4(&local, raddr);
	} else {
		return 0;
	}

	/* Not skc_num: by the time the state becomes CLOSE the port has been released
	 * from the bind table, which zeroes it. inet_sport survives. */
	local.port = BPF_CORE_READ((const struct inet_sock *)sk, inet_sport);
	local.proto = IPPROTO_TCP;
	rport = BPF_CORE_READ(sk, __sk_common.skc_dport);
	return emit(cookie, &local, raddr, rport, oldstate, stat, false);
}

static __always_inline __u64 *seen_slot(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&primary_seen, &zero);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(meshlb_sock_close, const struct sock *sk, int oldstate, int newstate)
{
	__u64 *seen;

	if (newstate != TCP_CLOSE)
		return 0;
	seen = seen_slot();
	if (seen)
		*seen = (__u64)sk;
	return report_close(sk, oldstate, MLB_TRACER_STAT_EMITTED);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(meshlb_sock_close_backup, const struct sock *sk, int oldstate, int newstate)
{
	__u64 *seen;

	if (newstate != TCP_CLOSE)
		return 0;
	seen = seen_slot();
	if (!seen || *seen == (__u64)sk)
		return 0;
	return report_close(sk, oldstate, MLB_TRACER_STAT_RECOVERED);
}

/*
 * The same closes seen from a cgroup's sock_ops hook. Measured on a 6.18 kernel: the
 * kernel skipped the tracepoint's programs, uncounted (no recursion miss), for every
 * state change done in a softirq that interrupted one particular task, while the
 * trace event itself and sock_ops callbacks ran for all of them; each skipped close
 * left its flow in conntrack on every mix (docs/benchmarks.md, "Conntrack after
 * load"). sock_ops callbacks are plain calls from tcp_set_state().
 *
 * A socket gets state callbacks once a program asks for them: at the passive
 * handshake's end, for sockets of this namespace whose local end is watched (with
 * the remote-port filter of nat endpoints). Other sockets run this program only for
 * the callbacks every socket gets (connect, establishment, RTO init), which return
 * at the first test.
 */
static __always_inline int ops_endpoint(const struct bpf_sock_ops *skops,
					struct endpoint_key *local, __u32 raddr[4], __u16 *rport)
{
	if (skops->family == AF_INET) {
		local->addr[0] = skops->local_ip4;
		raddr[0] = skops->remote_ip4;
		local->family = AF_INET;
	} else if (skops->family == AF_INET6) {
		local->addr[0] = skops->local_ip6[0];
		local->addr[1] = skops->local_ip6[1];
		local->addr[2] = skops->local_ip6[2];
		local->addr[3] = skops->local_ip6[3];
		raddr[0] = skops->remote_ip6[0];
		raddr[1] = skops->remote_ip6[1];
		raddr[2] = skops->remote_ip6[2];
		raddr[3] = skops->remote_ip6[3];
		local->family = AF_INET6;
		unmap_v4(local, raddr);
	} else {
		return -1;
	}
	/* local_port is in host order; remote_port holds the network-order port in
	 * the word's upper half on little-endian machines (bpf_ntohl undoes both) */
	local->port = bpf_htons((__u16)skops->local_port);
	local->proto = IPPROTO_TCP;
	*rport = bpf_htons((__u16)bpf_ntohl(skops->remote_port));
	return 0;
}

static __always_inline bool ops_watched(const struct endpoint_key *local, __u16 rport)
{
	struct endpoint_filter *filter = bpf_map_lookup_elem(&watched_endpoints, local);
	__u16 rp = bpf_ntohs(rport);

	if (!filter)
		return false;
	return !filter->rport_hi || (rp >= filter->rport_lo && rp <= filter->rport_hi);
}

SEC("sockops")
int meshlb_sock_ops(struct bpf_sock_ops *skops)
{
	struct endpoint_key local = {};
	__u32 raddr[4] = {};
	__u16 rport = 0;
	__u32 op = skops->op;
	__u64 cookie;

	if (op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] != TCP_CLOSE)
		return 1;
	cookie = bpf_get_netns_cookie(skops);
	if (tracer_cfg.netns_cookie && cookie != tracer_cfg.netns_cookie)
		return 1;
	if (ops_endpoint(skops, &local, raddr, &rport))
		return 1;
	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		if (ops_watched(&local, rport))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						  BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	/* CLOSE: handled here, whatever the tracepoint's programs do next */
	__u32 zero = 0;
	__u64 *last = bpf_map_lookup_elem(&sockops_closed, &zero);

	if (last)
		*last = bpf_get_socket_cookie(skops);
	emit(cookie, &local, raddr, rport, (int)skops->args[0], MLB_TRACER_STAT_SOCKOPS, false);
	return 1;
}

/*
 * A segment of a balanced flow that no socket here takes (a flow that moved to this
 * backend mid-connection because a mix's table or a router's next hops changed, a
 * handshake whose ACK went elsewhere) is answered with a reset and the flow is over
 * for its client; no socket of it will ever close here. Reported like a close, so
 * that every mix evicts the entry, instead of keeping it until the idle sweep.
 * Only resets without a socket or from a listener: a socket of the flow that exists
 * reports its own close. A listener also resets a stray segment (say a late ACK of
 * an older connection on the same tuple) that meets a handshake in progress, which
 * the kernel keeps: evicting that flow is harmless in dr (its next packets find the
 * closed-flow entry and go to the same backend) but would take a nat flow's reply
 * translation, so a listener's resets count on endpoints watched without a remote-port
 * filter only: dr VIPs (the agent gives nat VIPs the filter that passes every port).
 */
SEC("tp_btf/tcp_send_reset")
int BPF_PROG(meshlb_reset_sent, const struct sock *sk, const struct sk_buff *skb)
{
	struct endpoint_key local = {};
	__u32 raddr[4] = {};
	struct tcphdr th;
	unsigned char *head;
	__u16 nh, toff;
	__u8 version;
	__u64 cookie = 0;

	if (!skb)
		return 0;  /* an active reset of a socket: it reports its own close */
	if (sk && BPF_CORE_READ(sk, __sk_common.skc_state) != TCP_LISTEN)
		return 0;
	if (sk) {
		cookie = sock_netns_cookie(sk);
	} else {
		/* no socket: the namespace the segment arrived in (skb->dev is not
		 * set on every reset path, the listener's among them) */
		struct net *net = BPF_CORE_READ(skb, dev, nd_net.net);

		if (!net)
			return 0;
		bpf_core_read(&cookie, sizeof(cookie), &net->net_cookie);
	}
	if (tracer_cfg.netns_cookie && cookie != tracer_cfg.netns_cookie)
		return 0;

	head = BPF_CORE_READ(skb, head);
	nh = BPF_CORE_READ(skb, network_header);
	toff = BPF_CORE_READ(skb, transport_header);
	if (bpf_probe_read_kernel(&version, 1, head + nh))
		return 0;
	version >>= 4;
	if (version == 4) {
		struct iphdr ip;

		if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh) || ip.protocol != IPPROTO_TCP)
			return 0;
		raddr[0] = ip.saddr;
		local.addr[0] = ip.daddr;
		local.family = AF_INET;
	} else if (version == 6) {
		struct ipv6hdr ip6;

		/* transport_header is past any extension headers */
		if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh))
			return 0;
		__builtin_memcpy(raddr, ip6.saddr.in6_u.u6_addr32, 16);
		__builtin_memcpy(local.addr, ip6.daddr.in6_u.u6_addr32, 16);
		local.family = AF_INET6;
	} else {
		return 0;
	}
	if (bpf_probe_read_kernel(&th, sizeof(th), head + toff) || th.rst)
		return 0;
	local.port = th.dest;
	local.proto = IPPROTO_TCP;
	return emit(cookie, &local, raddr, th.source, MLB_SOCK_EVENT_RESET, MLB_TRACER_STAT_RESET,
		    sk != NULL);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
