/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
 * Values are taken exactly as they sit in the packet (network order, loaded as
 * host integers): the ones' complement sum is byte-order independent as long as
 * the checksum field is treated the same way, so no byte swaps are needed.
 */
#ifndef MLB_CSUM_H
#define MLB_CSUM_H

static __always_inline __u16 csum_fold64(__u64 s)
{
	s = (s & 0xffffffffull) + (s >> 32);
	s = (s & 0xffffffffull) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* Accumulate the change of one 32-bit word: ~from + to. */
static __always_inline __u64 csum_diff32(__u64 acc, __u32 from, __u32 to)
{
	return acc + (__u32)~from + to;
}

static __always_inline __u64 csum_diff16(__u64 acc, __u16 from, __u16 to)
{
	return acc + (__u16)~from + to;
}

static __always_inline __u64 csum_diff_addr(__u64 acc, const __u32 *from, const __u32 *to, int v6)
{
	acc = csum_diff32(acc, from[0], to[0]);
	if (v6) {
		acc = csum_diff32(acc, from[1], to[1]);
		acc = csum_diff32(acc, from[2], to[2]);
		acc = csum_diff32(acc, from[3], to[3]);
	}
	return acc;
}

/* New checksum after the changes accumulated in diff. */
static __always_inline __u16 csum_apply(__u16 old, __u64 diff)
{
	return (__u16)~csum_fold64((__u64)(__u16)~old + diff);
}

#endif
