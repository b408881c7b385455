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

/* Ring-buffer record of the socket-release tracer: a TCP socket whose local end is
 * a watched endpoint entered CLOSE. key.src/sport is the remote peer, key.dst/dport
 * the local endpoint, so for a dr VIP it is exactly the balancer's conntrack key. */
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

#endif /* MESHLB_H */
