/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps of the socket-release tracer (bpf/tracer.bpf.c). Layouts of keys and values
 * are in meshlb.h; meshlb/dataplane/layouts.py (TRACER_MAPS) says how Python reads
 * each, and tests/bpf/test_layouts_btf.py checks that against the object's BTF. */
#ifndef MLB_TRACER_MAPS_H
#define MLB_TRACER_MAPS_H

#include "meshlb.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_filter);
} watched_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	/* 4 MiB: ~58k records of 72 bytes, seconds of closes at any rate a host sees */
	__uint(max_entries, 4 * 1024 * 1024);
} sock_events SEC(".maps");

/* enum mlb_tracer_stat -> count. Per-CPU so that the hot path never contends on a
 * shared counter line. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MLB_TRACER_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tracer_stats SEC(".maps");

/*
 * The kernel runs a tracing program at most once per CPU at a time: when a softirq
 * closes a socket while the same CPU is inside this program for an application's
 * close(), the nested run is skipped and only counted (recursion_misses). Under a
 * few hundred concurrent connections that loses about 2 closes in 1000, and each
 * loss is a conntrack entry on every mix that nothing will evict. So the program is
 * attached twice. The primary notes, per CPU, the last socket it handled; the
 * backup runs right after it, and reports only the sockets the primary did not
 * note: those it missed, because the two are never both skipped for one event.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} primary_seen SEC(".maps");

/*
 * Socket cookie of the last close the sock_ops program handled on this CPU. The
 * kernel calls it and then, in the same tcp_set_state(), the tracepoint: the
 * tracepoint's programs skip that socket. A cookie is never reused, unlike a socket's
 * address; a socket nobody asked the cookie of reads 0 and matches nothing.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sockops_closed SEC(".maps");

/* Resets reported per CPU in the current window (see take_reset_budget). */
struct reset_budget {
	__u64 window_start;
	__u64 used;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct reset_budget);
} reset_budget SEC(".maps");

/*
 * The balancer's conntrack, closed-flow and backend maps. The agent loads this object
 * with the balancer's own maps in their place (bpf_map__reuse_fd); loaded alone
 * (tests, a tracer without a balancer) these one-entry stand-ins stay empty and
 * every close is reported.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1);
	__type(key, struct flow_key);
	__type(value, struct ct_value);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1);
	__type(key, struct flow_key);
	__type(value, struct ct_value);
} ct_closed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

#endif
