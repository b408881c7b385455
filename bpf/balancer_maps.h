/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps of the balancer. Layouts of keys and values are in meshlb.h; meshlb/dataplane/
 * layouts.py (BALANCER_MAPS) says how Python reads each, and tests/bpf/test_layouts_btf.py
 * checks that against the object's BTF. */
#ifndef MLB_BALANCER_MAPS_H
#define MLB_BALANCER_MAPS_H

#include "meshlb.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MLB_MAX_VIPS);
	__type(key, struct vip_key);
	__type(value, struct vip_meta);
} vips SEC(".maps");

/* vip id -> the VIP's meta (same value as in vips), for the conntrack hit path */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLB_MAX_VIPS);
	__type(key, __u32);
	__type(value, struct vip_meta);
} vip_info SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLB_VIP_FILTER_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} vip_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MLB_FIB_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct fib_cache);
} fib_cache SEC(".maps");

/* Inner template of vip_tables. BPF_F_INNER_MAP lets each VIP's table have its own
 * size; Python creates the real inner maps with the same type/sizes/flags. */
struct vip_table {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);   /* backend id */
};

/* vip id -> Maglev table. Replacing the inner map is one update, so a packet sees
 * the old or the new table, never a mix; unused VIP ids cost one empty slot. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, MLB_MAX_VIPS);
	__type(key, __u32);
	__array(values, struct vip_table);
} vip_tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

/*
 * One hash table for every CPU, with the kernel's common LRU list: whichever CPU a
 * packet of a flow arrives on finds the flow's one entry, and one CPU may fill the
 * whole map (BPF_F_NO_COMMON_LRU would split max_entries over the possible CPUs).
 * Each CPU takes free entries from the common list a batch at a time, so a few
 * hundred entries per CPU may sit unused: meshlb/dataplane/capacity.py adds them to
 * the capacity it promises. docs/architecture.md, "Conntrack", has the measurements.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MLB_CT_DEFAULT_SIZE);
	__type(key, struct flow_key);
	__type(value, struct ct_value);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MLB_CT_DEFAULT_SIZE);
	__type(key, struct flow_key);
	__type(value, struct nat_rev_value);
} nat_reverse SEC(".maps");

/* Flows whose socket closed: when the agent evicts a conntrack entry it moves it
 * here. Segments that still arrive after the close (the client's last ACK, a window
 * update, a retransmitted FIN) follow the flow to its old backend, with its SNAT
 * port, without bringing the conntrack entry back. Written by the agent only. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MLB_CT_CLOSED_SIZE);
	__type(key, struct flow_key);
	__type(value, struct ct_value);
} ct_closed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct snat_config);
} snat_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MLB_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MLB_MAX_VIPS);
	__type(key, __u32);
	__type(value, struct lb_stats);
} vip_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MLB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_stats);
} backend_stats SEC(".maps");

/* MLB_PROG_* -> a program of this object (Balancer.load fills it). Pinned with the
 * rest: an XDP program left running by an agent that is gone keeps reaching them. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, MLB_PROG_MAX);
	__type(key, __u32);
	__type(value, __u32);
} progs SEC(".maps");

/* The path MTU meshlb_too_big is to announce, from the program that tail-calls it. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} too_big_mtu SEC(".maps");

/* ifindex -> 1 where the tc program meshlb_neigh takes packets handed over for their
 * neighbour (Balancer.neighbour_handoff sets it once the program is attached). Not
 * pinned: every load starts without, until its program is attached again. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} neigh_handoff SEC(".maps");

/* Next hops found without a neighbour entry (struct neigh_key): the agent reads them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MLB_NEIGH_MISSING_SIZE);
	__type(key, struct neigh_key);
	__type(value, struct neigh_seen);
} neigh_missing SEC(".maps");

/* The agent's batch of evictions (struct evict_batch, meshlb.h): written and read
 * through mmap, so a batch costs the one BPF_PROG_TEST_RUN of meshlb_evict. Scratch
 * space of one agent: never pinned, a new load gets a new one. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct evict_batch);
} evict_batch SEC(".maps");

#endif
