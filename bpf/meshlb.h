/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every layout the BPF programs share with Python is declared here and only here.
 * meshlb/dataplane/layouts.py mirrors it; tests/bpf/test_layouts_btf.py checks the
 * mirror against the BTF of the compiled objects, so the two cannot drift.
 *
 * Conventions: addresses are 16 bytes; IPv4 uses the first 4 bytes and leaves the
 * rest zero. Addresses and ports are in network byte order, everything else in host
 * order. Explicit padding so that C and Python agree without compiler guesses.
 */
#ifndef MESHLB_H
#define MESHLB_H

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* A flow as the balancer keys it: the client's side in src, the VIP's in dst. */
struct flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;   /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;  /* AF_INET or AF_INET6 */
	__u8 pad[2];
};

/* A local endpoint (address, port, protocol) whose sockets the tracer reports on:
 * a VIP served here (dr mode) or a backend endpoint of this node (nat mode). */
struct endpoint_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 family;
};

/* What the tracer requires of a watched endpoint's remote end: its port within
 * [rport_lo, rport_hi] (host order; 0/0: any). A nat backend endpoint is watched for
 * SNAT source ports only, so the node's other clients of the same port (health checks,
 * direct traffic) never cost a ring-buffer record. */
struct endpoint_filter {
	__u16 rport_lo;
	__u16 rport_hi;
};

/* Ring-buffer record of the socket-release tracer: a TCP socket whose local end is
 * a watched endpoint entered CLOSE. key.src/sport is the remote peer, key.dst/dport
 * the local endpoint, so for a dr VIP it is exactly the balancer's conntrack key. */
/* sock_event.oldstate of a segment no socket took (the kernel answered it with a
 * reset): not a TCP state, those start at 1. */
#define MLB_SOCK_EVENT_RESET 0

struct sock_event {
	struct flow_key key;
	__u64 netns_cookie;
	__u64 timestamp_ns;  /* bpf_ktime_get_ns() at the state change */
	__u32 oldstate;
	__u32 pad;
};

/* Load-time constants of the tracer (const volatile, set before load). */
struct tracer_config {
	__u64 netns_cookie;  /* 0: report every namespace */
};

/* Index into the tracer's per-CPU "tracer_stats" array. */
enum mlb_tracer_stat {
	MLB_TRACER_STAT_EMITTED = 0,     /* records written to the ring buffer */
	MLB_TRACER_STAT_RINGBUF_FULL,    /* records lost: the ring buffer was full */
	MLB_TRACER_STAT_RECOVERED,       /* emitted by the backup: the primary missed it */
	MLB_TRACER_STAT_RESET,           /* emitted for a segment no socket took */
	MLB_TRACER_STAT_RESET_LIMITED,   /* such segments over the per-CPU budget, unreported */
	MLB_TRACER_STAT_LOCAL_EVICTED,   /* closes evicted by the program, not reported */
	MLB_TRACER_STAT_SOCKOPS,         /* closes the sock_ops program handled */
	MLB_TRACER_STAT_MAX,
};

/* ------------------------------------------------------------------------------
 * Balancer (bpf/balancer.bpf.c). Everything below is owned by the balancer.
 * ------------------------------------------------------------------------------ */

#define MLB_MAX_VIPS          1024   /* vip ids are 0..MLB_MAX_VIPS-1 */
#define MLB_MAX_BACKENDS      4096   /* backend ids are 0..MLB_MAX_BACKENDS-1 */
#define MLB_DEFAULT_RING      65537  /* Maglev table size, prime */
#define MLB_CT_DEFAULT_SIZE   262144 /* conntrack entries; the agent sizes the map from the
                                     * host (meshlb/dataplane/capacity.py) */
#define MLB_CT_CLOSED_SIZE    65536  /* recently closed flows remembered (ct_closed) */
#define MLB_FIB_RC_SLOTS      16     /* counters reserved for bpf_fib_lookup codes */
#define MLB_SNAT_PROBES       4      /* source ports tried per new nat flow */
#define MLB_HASH_SEED         0x6d6c6221u

/* Anti ping-pong mark of a packet one mix forwards to another (dr mode).
 * IPv4: the reserved "evil" bit of frag_off, which RFC 791 requires to be zero, so
 *   no legitimate sender sets it.
 * IPv6: the whole 20-bit flow label is overwritten with MLB_V6_MARK. IPv6 has no
 *   must-be-zero bit: traffic class carries DSCP/ECN the network acts on, and a
 *   single flow-label bit would be set by half of all clients (RFC 6437 labels are
 *   random). A fixed 20-bit value collides with a random client label with
 *   probability 2^-20 per flow, and a collision only means that flow is served by the
 *   mix it reached. The flow label is not covered by any checksum. Un-marking sets
 *   the label to 0 (a valid "no label"). */
#define MLB_V4_MARK           0x8000 /* host order, in iph->frag_off */
#define MLB_V6_MARK           0x6d1b5u

/* VIP table key. Address/port in network order. */
struct vip_key {
	__u32 addr[4];
	__u16 port;
	__u8 proto;
	__u8 family;
};

/* vip_meta.flags */
#define MLB_VIP_F_NAT         (1u << 0) /* full NAT; otherwise dr (mix mode) */
#define MLB_VIP_F_ACTIVE      (1u << 1) /* set in vip_info while the VIP exists */

/* Value of "vips" (by address) and of "vip_info" (the same, by vip id). The
 * conntrack hit path reads vip_info[ct->vip_id], an array slot, instead of hashing
 * the VIP key again; gen tells it whether the VIP the flow was set up for still
 * exists in the same mode (Python bumps it on remove and on a mode change). */
struct vip_meta {
	__u32 vip_id;     /* index into vip_tables, vip_info, vip_stats */
	__u32 flags;      /* MLB_VIP_F_* */
	__u32 ring_size;  /* entries of this VIP's Maglev table */
	__u32 gen;
};

/* Address pre-filter: "vip_filter" is an array of MLB_VIP_FILTER_SLOTS counters
 * indexed by mlb_addr_slot(destination address) = (fold(addr) * MULT) >> SHIFT,
 * fold = xor of the address words, non-zero when
 * some VIP may have that address. Most non-VIP packets skip the VIP hash lookup. */
#define MLB_VIP_FILTER_SLOTS  4096
#define MLB_VIP_FILTER_MULT   0x9e3779b1u
#define MLB_VIP_FILTER_SHIFT  20

/* backend.flags */
#define MLB_BE_F_VALID        (1u << 0) /* slot in use; a zeroed slot is never chosen */
#define MLB_BE_F_LOCAL        (1u << 1) /* this node: pass to the local stack */
#define MLB_BE_F_DOWN         (1u << 2) /* do not send new or existing flows */
#define MLB_BE_F_EXTERNAL     (1u << 3) /* a real server, not a mix: what goes to it
                                          * carries no peer mark, and no tracer of its
                                          * reports its closes (see MLB_CT_F_CLOSING) */

struct backend {
	__u32 addr[4];    /* network order */
	__u16 port;       /* network order; nat target port, 0 = keep the VIP's port */
	__u8 family;
	__u8 pad;
	__u32 flags;      /* MLB_BE_F_* */
};

/* ct_value.flags */
#define MLB_CT_F_NAT          (1u << 0) /* snat_port is valid, a reverse entry exists */
#define MLB_CT_F_ESTABLISHED  (1u << 1) /* the client acknowledged the handshake (or the
                                          * flow is not a TCP one set up by a SYN here):
                                          * without it the agent expires the entry after
                                          * conntrack.handshake_timeout_s, as LVS does
                                          * SYN_RECV, since a handshake nobody finishes
                                          * leaves no socket whose close would evict it */
#define MLB_CT_F_PEER_SEEN    (1u << 2) /* packets of this flow also came here from a peer
                                          * (or the entry was set up mid-flow): another
                                          * mix may hold it, so its close is gossiped
                                          * even when this mix forwarded it to itself */
#define MLB_CT_F_CLOSING      (1u << 3) /* a FIN or RST of the flow went through here:
                                          * the agent expires the entry once it has been
                                          * idle for conntrack.closing_timeout_s when its
                                          * backend has no tracer to report the close */

/* conntrack: struct flow_key (client -> VIP, as received) -> ct_value */
struct ct_value {
	__u64 last_seen_ns; /* CLOCK_MONOTONIC at jiffy resolution (mlb_now(), balancer.bpf.c) */
	__u32 backend_id;
	__u32 flags;        /* MLB_CT_F_* */
	__u32 vip_id;
	__u32 vip_gen;      /* vip_meta.gen when the flow was set up */
	__u16 snat_port;    /* network order */
	__u16 pad;
	__u32 syn_seq;      /* sequence number of the SYN that set the flow up (host
	                     * order; 0: picked up mid-flow): a retransmitted SYN carries
	                     * the same one, a new connection on the same tuple another */
};

/* Per-CPU cache of bpf_fib_lookup results by destination address (a backend, or a
 * client for nat replies): the route+neighbour lookup is most of the cost of a
 * conntrack hit. Slot = mlb_addr_slot(addr) & (MLB_FIB_CACHE_SLOTS - 1); entries
 * live MLB_FIB_CACHE_NS and Python clears them when it knows better. */
#define MLB_FIB_CACHE_SLOTS   4096
#define MLB_FIB_CACHE_NS      200000000ull
struct fib_cache {
	__u32 addr[4];          /* destination the lookup was for */
	__u8 dmac[6];
	__u8 smac[6];
	__u32 ifindex;          /* egress */
	__u32 ingress_ifindex;  /* the lookup was made for packets from here */
	__u32 mtu;              /* bigger packets take the full lookup (FRAG_NEEDED) */
	__u8 family;
	__u8 pad[3];
	__u64 expires_ns;
};

/* nat_reverse: struct flow_key of the reply as the backend sends it
 * (src = backend addr:port, dst = snat addr:port) -> the original flow. */
struct nat_rev_value {
	struct flow_key orig; /* client -> VIP, as the client sent it */
	__u64 last_seen_ns;
	__u32 backend_id;
	__u32 pad;
};

/*
 * A next hop without a neighbour entry: XDP cannot have the kernel resolve it, so the
 * packet (translated, marked: ready to leave) is passed up with this in its metadata,
 * and the tc ingress program meshlb_neigh sends it with bpf_redirect_neigh(), which
 * resolves the neighbour and queues the packet meanwhile. XDP does so only on a device
 * whose tc program Python installed ("neigh_handoff"); elsewhere it drops. Either way
 * the next hop is noted in "neigh_missing", which the agent reads.
 */
#define MLB_NEIGH_META_MAGIC  0x6d6c6e68u  /* "mlnh" */
#define MLB_NEIGH_MISSING_SIZE 1024
struct neigh_meta {
	__u32 magic;
	__u32 ifindex;   /* egress device */
	__u32 family;    /* of the next hop */
	__u32 nh[4];     /* next hop address, network order */
};

struct neigh_key {
	__u32 addr[4];   /* the next hop */
	__u32 ifindex;
	__u8 family;
	__u8 pad[3];
};

struct neigh_seen {
	__u64 first_ns;  /* mlb_now() */
	__u64 last_ns;
	__u64 packets;
};

/* Slots of "progs", the balancer's programs for rare packets, reached by tail call:
 * each has a stack of its own (the verifier allows 512 bytes per call chain, and the
 * fast path's takes most of it). */
#define MLB_PROG_ICMP         0   /* meshlb_icmp: an ICMP error to a VIP address */
#define MLB_PROG_TOO_BIG      1   /* meshlb_too_big: answer a packet too big for its path */
#define MLB_PROG_MAX          2

/* The balancer's clock (mlb_now): ns = ((jiffies * mult) >> MLB_CLOCK_SHIFT) + offset,
 * scale and offset set by the "meshlb_clock_sync" syscall program from one reading of
 * bpf_jiffies64() and bpf_ktime_get_ns(). hz in: the kernel's tick rate, 0 to use
 * CONFIG_HZ; out: the rate used, 0 when neither told it (then Python measures it). */
#define MLB_CLOCK_SHIFT       4
struct clock_sync {
	__u32 hz;
	__u32 pad;
	__u64 jiffies;  /* out: bpf_jiffies64() */
	__u64 mono_ns;  /* out: bpf_ktime_get_ns() at the same moment */
};

/* Batch eviction (the "meshlb_evict" syscall program, run by BPF_PROG_TEST_RUN):
 * the agent writes up to MLB_EVICT_BATCH keys into the mmapped "evict_batch" map,
 * runs the program once, and reads what each key removed. Every close and every
 * eviction a peer sends costs one slot instead of three to five map syscalls. */
#define MLB_EVICT_BATCH       256
/* evict_slot.op (in): what the key names */
#define MLB_EVICT_OP_AUTO     0   /* a VIP in dst: forward, otherwise backend side */
#define MLB_EVICT_OP_FORWARD  1   /* client -> VIP, the conntrack key */
#define MLB_EVICT_OP_BACKEND  2   /* SNAT addr:port -> backend addr:port, as a nat
                                   * backend's socket saw it */
#define MLB_EVICT_OP_EXPIRE   3   /* client -> VIP, with .ct the entry as an expiry scan
                                   * read it: removed unless a packet touched it since
                                   * (last_seen_ns or flags differ), not into ct_closed */
/* evict_slot.result (out): what was removed */
#define MLB_EVICT_NONE        0   /* nothing held here (or, expiring, touched since) */
#define MLB_EVICT_FORWARD     1   /* a conntrack entry (copied into .ct), now in ct_closed */
#define MLB_EVICT_BACKEND     2   /* a nat reverse entry (and its forward entry, if
                                   * that was still the same flow) */
#define MLB_EVICT_EXPIRED     3   /* a conntrack entry, gone with its nat reverse entry */
struct evict_slot {
	struct flow_key key;
	__u32 op;
	__u32 result;
	struct ct_value ct;  /* in for MLB_EVICT_OP_EXPIRE, out for MLB_EVICT_FORWARD */
};
struct evict_batch {
	__u32 count;   /* slots in use; the program clamps it to MLB_EVICT_BATCH */
	__u32 pad;
	struct evict_slot slots[MLB_EVICT_BATCH];
};
/* snat_config array: index 0 = IPv4, 1 = IPv6 */
#define MLB_SNAT_F_VALID      (1u << 0)
struct snat_config {
	__u32 addr[4];    /* network order */
	__u16 port_lo;    /* host order, inclusive */
	__u16 port_hi;    /* host order, inclusive */
	__u32 flags;
};

/* per-VIP and per-backend traffic (per-CPU arrays indexed by id) */
struct lb_stats {
	__u64 packets;
	__u64 bytes;
};

/* Index into the per-CPU "counters" array: every pass/drop reason has its own. */
enum mlb_counter {
	MLB_CNT_RX = 0,            /* packets seen */
	MLB_CNT_PASS_NOT_IP,       /* non-IP ethertype, stacked VLAN tags */
	MLB_CNT_PASS_MALFORMED,    /* truncated or inconsistent header */
	MLB_CNT_PASS_BAD_IHL,      /* IPv4 IHL < 5 or version mismatch */
	MLB_CNT_PASS_FRAGMENT,     /* IPv4 MF/offset or IPv6 fragment header */
	MLB_CNT_PASS_V6_EXT,       /* IPv6 extension headers not walked */
	MLB_CNT_PASS_UNKNOWN_L4,   /* neither TCP nor UDP */
	MLB_CNT_PASS_NOT_VIP,      /* well-formed, not for a VIP */
	MLB_CNT_PASS_LOCAL,        /* backend is this node */
	MLB_CNT_PASS_FROM_PEER,    /* carried a peer's mark: un-marked, passed */
	MLB_CNT_PASS_NEIGH_RESOLVE, /* no neighbour entry for the next hop: handed, with the
	                             * next hop, to the tc program (meshlb_neigh), which has
	                             * the kernel resolve it and send the packet on */
	MLB_CNT_PASS_ICMP_NO_FLOW, /* an ICMP error to a VIP address about no flow of a VIP */
	MLB_CNT_DROP_FIB,          /* fib said blackhole/unreachable/prohibit */
	MLB_CNT_DROP_NO_TABLE,     /* VIP without a (matching) Maglev table */
	MLB_CNT_DROP_NO_BACKEND,   /* table slot points to a missing/down backend */
	MLB_CNT_DROP_NO_SNAT,      /* nat VIP, no SNAT address for the family */
	MLB_CNT_DROP_SNAT_EXHAUSTED, /* all probed SNAT ports taken */
	MLB_CNT_DROP_UDP6_ZERO_CSUM, /* nat of IPv6 UDP with checksum 0 */
	MLB_CNT_DROP_FIB_OTHER,    /* fib failed otherwise (forwarding off on the device, a
	                            * local route...): a packet of a remote backend never goes
	                            * to the local stack, which would answer for it */
	MLB_CNT_DROP_NO_NEIGH,     /* no neighbour entry, and no tc program to resolve it */
	MLB_CNT_DROP_TOO_BIG,      /* bigger than the path: IPv4 without DF (not fragmented
	                            * here) or an ICMP error (never answered with another) */
	MLB_CNT_DROP_BACKEND_FAMILY, /* the table's backend is of another family than the VIP */
	MLB_CNT_CT_HIT,
	MLB_CNT_CT_MISS,
	MLB_CNT_CT_RESELECT,       /* entry existed, but SYN or backend gone */
	MLB_CNT_CT_INSERT,
	MLB_CNT_CT_INSERT_FAIL,
	MLB_CNT_NAT_REPLY,         /* reply translated back to VIP -> client */
	MLB_CNT_NAT_REPLY_MISS,    /* to an SNAT addr/port range, no entry: passed */
	MLB_CNT_TX,
	MLB_CNT_REDIRECT,
	MLB_CNT_FIB_CACHED,        /* forwarded with a cached fib result */
	MLB_CNT_CT_SKIP_CLOSING,   /* dr/local miss on FIN/RST: forwarded, not remembered */
	MLB_CNT_PASS_NAT_NO_FLOW,  /* nat miss on a non-SYN TCP packet: no translation
	                            * can be right, the local stack answers with RST */
	MLB_CNT_CT_CLOSED_HIT,     /* miss on a segment (or a retransmitted SYN) of a flow
	                            * closed and evicted: sent to its old backend, not
	                            * re-inserted */
	MLB_CNT_CT_HANDSHAKE_RESET, /* the client reset a handshake (its RST carries the
	                             * SYN's sequence number + 1): forwarded, entry removed */
	MLB_CNT_ICMP_TOO_BIG,      /* fragmentation-needed / packet-too-big sent back to a
	                            * sender whose packet does not fit the path on */
	MLB_CNT_ICMP_TO_BACKEND,   /* ICMP error about a VIP flow, sent on to its backend */
	MLB_CNT_NEIGH_SENT,        /* tc: handed-over packets the kernel's neighbour code took */
	MLB_CNT_FIB_RC,            /* MLB_FIB_RC_SLOTS slots: fib failures by code */
	MLB_CNT_MAX = MLB_CNT_FIB_RC + MLB_FIB_RC_SLOTS,
};

/* The reasons the balancer drops a packet for, every other one passes it to the
 * stack: one range, so that one comparison tells. A new DROP_* reason goes inside it
 * (the layout test fails otherwise). */
#define MLB_CNT_DROP_FIRST    MLB_CNT_DROP_FIB
#define MLB_CNT_DROP_LAST     MLB_CNT_DROP_BACKEND_FAMILY

#endif /* MESHLB_H */
