/* SHA-256 of many 4 KiB pages at once: sixteen pages side by side, one in
 * each 32-bit lane of AVX-512 registers.
 *
 * The CPU's SHA extensions hash one message at a time, about 1.6 GB/s per
 * core here, whether through Bun.SHA256 or OpenSSL; sgm hashes every page
 * it moves, in each role, so that was its largest cost. Sixteen lanes of
 * plain SHA-256 arithmetic go faster than one lane of SHA-NI. The digests
 * are the same SHA-256 (test/dedup.test.ts checks them against
 * Bun.SHA256); the caller falls back to Bun.SHA256 where this returns -1.
 *
 * Built by the Makefile into a shared object that dist/sgm embeds and
 * loads through bun:ffi (core/dedup/native-digest.ts). */

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGE_BYTES 4096
#define BLOCKS_PER_PAGE (PAGE_BYTES / 64)
#define LANES 16

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* Every page ends with the same padding block (0x80, zeros, the length
 * 32768 bits): K[t] plus its message schedule, computed once. */
static uint32_t padding_kw[64];

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static int supported;

/* Before any thread can call in: digest threads load the library too. */
__attribute__((constructor)) static void init(void) {
	__builtin_cpu_init();
	supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
	uint32_t w[64] = {0x80000000u};
	w[15] = PAGE_BYTES * 8;
	for (int t = 16; t < 64; t++) {
		uint32_t s0 = ror(w[t - 15], 7) ^ ror(w[t - 15], 18) ^ (w[t - 15] >> 3);
		uint32_t s1 = ror(w[t - 2], 17) ^ ror(w[t - 2], 19) ^ (w[t - 2] >> 10);
		w[t] = w[t - 16] + s0 + w[t - 7] + s1;
	}
	for (int t = 0; t < 64; t++) padding_kw[t] = K[t] + w[t];
}

#define AVX512 __attribute__((target("avx512f,avx512bw")))

#define XOR3(x, y, z) _mm512_ternarylogic_epi32((x), (y), (z), 0x96)
#define CH(e, f, g) _mm512_ternarylogic_epi32((e), (f), (g), 0xca)
#define MAJ(a, b, c) _mm512_ternarylogic_epi32((a), (b), (c), 0xe8)
#define ADD _mm512_add_epi32

/* One round; kw is K[t] + W[t] for every lane. */
#define ROUND(a, b, c, d, e, f, g, h, kw)                                                                        \
	do {                                                                                                     \
		__m512i t1 = ADD(ADD(h, XOR3(_mm512_ror_epi32(e, 6), _mm512_ror_epi32(e, 11), _mm512_ror_epi32(e, 25))), \
				 ADD(CH(e, f, g), kw));                                                          \
		__m512i t2 = ADD(XOR3(_mm512_ror_epi32(a, 2), _mm512_ror_epi32(a, 13), _mm512_ror_epi32(a, 22)), MAJ(a, b, c)); \
		d = ADD(d, t1);                                                                                  \
		h = ADD(t1, t2);                                                                                 \
	} while (0)

/* 64 rounds over a..h, kw(t) giving K[t] + W[t]: the names rotate, so no state moves. */
#define ROUNDS8(t, KW)                            \
	ROUND(a, b, c, d, e, f, g, h, KW((t) + 0)); \
	ROUND(h, a, b, c, d, e, f, g, KW((t) + 1)); \
	ROUND(g, h, a, b, c, d, e, f, KW((t) + 2)); \
	ROUND(f, g, h, a, b, c, d, e, KW((t) + 3)); \
	ROUND(e, f, g, h, a, b, c, d, KW((t) + 4)); \
	ROUND(d, e, f, g, h, a, b, c, KW((t) + 5)); \
	ROUND(c, d, e, f, g, h, a, b, KW((t) + 6)); \
	ROUND(b, c, d, e, f, g, h, a, KW((t) + 7))

/* Rows r[i] (lane i's sixteen words) become columns w[j] (word j of every lane). */
AVX512 static void transpose16(const __m512i r[16], __m512i w[16]) {
	__m512i t[16], u[16];
	for (int i = 0; i < 8; i++) {
		t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
		t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
	}
	/* u[4i+m], 128-bit lane k: rows 4i..4i+3, word 4k+m */
	for (int i = 0; i < 4; i++) {
		u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
		u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
		u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
		u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
	}
	for (int m = 0; m < 4; m++) {
		__m512i v0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44);
		__m512i v1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xee);
		__m512i v2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
		__m512i v3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xee);
		w[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
		w[4 + m] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
		w[8 + m] = _mm512_shuffle_i32x4(v1, v3, 0x88);
		w[12 + m] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
	}
}

/* The pages at p[0..15] (any addresses) to their digests at out[0..15]. */
AVX512 static void hash16(const uint8_t *const p[LANES], uint8_t *const out[LANES]) {
	const __m512i bswap = _mm512_set4_epi32(0x0c0d0e0f, 0x08090a0b, 0x04050607, 0x00010203);
	__m512i a = _mm512_set1_epi32((int)H0[0]), b = _mm512_set1_epi32((int)H0[1]);
	__m512i c = _mm512_set1_epi32((int)H0[2]), d = _mm512_set1_epi32((int)H0[3]);
	__m512i e = _mm512_set1_epi32((int)H0[4]), f = _mm512_set1_epi32((int)H0[5]);
	__m512i g = _mm512_set1_epi32((int)H0[6]), h = _mm512_set1_epi32((int)H0[7]);
	__m512i w[16], rows[16];
	for (int block = 0; block <= BLOCKS_PER_PAGE; block++) {
		__m512i sa = a, sb = b, sc = c, sd = d, se = e, sf = f, sg = g, sh = h;
		if (block < BLOCKS_PER_PAGE) {
			for (int i = 0; i < LANES; i++) rows[i] = _mm512_shuffle_epi8(_mm512_loadu_si512(p[i] + block * 64), bswap);
			transpose16(rows, w);
			/* W[t] for t >= 16 in place, sixteen at a time, each round's K added as it goes */
#define W(t) w[(t) & 15]
#define SCHEDULE(t)                                                                                                 \
	(W(t) = ADD(ADD(W(t), XOR3(_mm512_ror_epi32(W((t) - 15), 7), _mm512_ror_epi32(W((t) - 15), 18), _mm512_srli_epi32(W((t) - 15), 3))), \
		    ADD(W((t) - 7), XOR3(_mm512_ror_epi32(W((t) - 2), 17), _mm512_ror_epi32(W((t) - 2), 19), _mm512_srli_epi32(W((t) - 2), 10)))))
#define KW_FIRST(t) ADD(W(t), _mm512_set1_epi32((int)K[t]))
#define KW_LATER(t) ADD(SCHEDULE(t), _mm512_set1_epi32((int)K[t]))
			ROUNDS8(0, KW_FIRST);
			ROUNDS8(8, KW_FIRST);
#pragma GCC unroll 3
			for (int t = 16; t < 64; t += 16) {
				ROUNDS8(t, KW_LATER);
				ROUNDS8(t + 8, KW_LATER);
			}
		} else {
#define KW_PADDING(t) _mm512_set1_epi32((int)padding_kw[t])
#pragma GCC unroll 4
			for (int t = 0; t < 64; t += 16) {
				ROUNDS8(t, KW_PADDING);
				ROUNDS8(t + 8, KW_PADDING);
			}
		}
		a = ADD(a, sa), b = ADD(b, sb), c = ADD(c, sc), d = ADD(d, sd);
		e = ADD(e, se), f = ADD(f, sf), g = ADD(g, sg), h = ADD(h, sh);
	}
	uint32_t state[8][LANES] __attribute__((aligned(64)));
	const __m512i words[8] = {a, b, c, d, e, f, g, h};
	for (int k = 0; k < 8; k++) _mm512_store_si512(state[k], _mm512_shuffle_epi8(words[k], bswap));
	for (int i = 0; i < LANES; i++) {
		uint32_t digest[8];
		for (int k = 0; k < 8; k++) digest[k] = state[k][i];
		memcpy(out[i], digest, sizeof digest);
	}
}

/* Pages first + 0 .. first + 15 of a call (fewer at its end: lanes past the
 * last page hash it again, into a spare digest). */
static void hash_group(const uint8_t *base, const uint32_t *offsets, uint32_t count, uint8_t *digests, uint32_t first) {
	uint8_t spare[LANES][32];
	const uint8_t *p[LANES];
	uint8_t *out[LANES];
	for (uint32_t i = 0; i < LANES; i++) {
		uint32_t n = first + i < count ? first + i : count - 1;
		p[i] = base + offsets[n];
		out[i] = first + i < count ? digests + (uint64_t)n * 32 : spare[i];
	}
	hash16(p, out);
}

/* Digests of `count` pages, page n at base + offsets[n], to digests[32 n ..].
 * 0, or -1 when this CPU lacks AVX-512 (nothing written). The caller has
 * checked that every page lies within its buffer. */
int sgm_sha256_pages_at(const uint8_t *base, const uint32_t *offsets, uint32_t count, uint8_t *digests) {
	if (!supported) return -1;
	for (uint32_t first = 0; first < count; first += LANES) hash_group(base, offsets, count, digests, first);
	return 0;
}

/* Helper threads that hash a call's groups of sixteen pages beside the
 * thread that called, where they lie: a scatter's reader hashes each chunk
 * of its source's stream in place, and with helpers it pays for its share
 * of the chunk only. The caller claims groups too, so a helper the kernel
 * has not scheduled before the call is done costs it nothing but the wake
 * (one that claimed a group and then lost its core makes the call wait).
 *
 * One call at a time uses them (a call finding them busy hashes alone).
 * A call is published as `ticket`: its number, its count of groups and the
 * next group to claim, in one word. A group is claimed by a compare and
 * swap of that whole word, so a claim succeeds only while its call is
 * under way, and a call returns only once every group it published is
 * done: its addresses, read by a helper after it saw the call's number,
 * stay good through every claim. */
#define TICKET(number, groups, next) ((uint64_t)(number) << 32 | (uint64_t)(groups) << 16 | (next))
#define TICKET_NUMBER(t) ((uint32_t)((t) >> 32))
#define TICKET_GROUPS(t) ((uint32_t)((t) >> 16) & 0xffff)
#define TICKET_NEXT(t) ((uint32_t)(t) & 0xffff)
static struct {
	const uint8_t *base;
	const uint32_t *offsets;
	uint32_t count;
	uint8_t *digests;
} call;
static _Atomic uint64_t ticket;
static _Atomic uint32_t call_number; /* futex word: helpers sleep until it moves */
static _Atomic uint32_t groups_done; /* futex word: the caller sleeps until every group is done */
static atomic_flag busy = ATOMIC_FLAG_INIT;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int helpers;
static _Atomic uint64_t helper_pages; /* pages the helpers hashed, in all */

static void futex_wait(_Atomic uint32_t *word, uint32_t seen) { syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0); }
static void futex_wake(_Atomic uint32_t *word, int n) { syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0); }

/* Claims and hashes groups of call `number` until none is left. */
static void claim_groups(uint32_t number, int by_helper) {
	uint64_t t = atomic_load_explicit(&ticket, memory_order_acquire);
	if (TICKET_NUMBER(t) != number) return;
	/* relaxed: read while the next call may write them, and used only once a claim proves they are this call's */
	const uint8_t *base = __atomic_load_n(&call.base, __ATOMIC_RELAXED);
	const uint32_t *offsets = __atomic_load_n(&call.offsets, __ATOMIC_RELAXED);
	uint32_t count = __atomic_load_n(&call.count, __ATOMIC_RELAXED);
	uint8_t *digests = __atomic_load_n(&call.digests, __ATOMIC_RELAXED);
	for (;;) {
		if (TICKET_NUMBER(t) != number || TICKET_NEXT(t) >= TICKET_GROUPS(t)) return;
		if (!atomic_compare_exchange_weak_explicit(&ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire)) continue;
		uint32_t first = TICKET_NEXT(t) * LANES;
		hash_group(base, offsets, count, digests, first);
		if (by_helper) atomic_fetch_add_explicit(&helper_pages, count - first < LANES ? count - first : LANES, memory_order_relaxed);
		if (atomic_fetch_add_explicit(&groups_done, 1, memory_order_release) + 1 == TICKET_GROUPS(t) && by_helper) futex_wake(&groups_done, 1);
		t = atomic_load_explicit(&ticket, memory_order_acquire);
	}
}

static void *helper(void *unused) {
	(void)unused;
	uint32_t seen = 0;
	for (;;) {
		uint32_t number = atomic_load_explicit(&call_number, memory_order_acquire);
		if (number == seen) {
			futex_wait(&call_number, seen);
			continue;
		}
		seen = number;
		claim_groups(number, 1);
	}
	return NULL;
}

/* Starts helper threads until there are `wanted`; returns how many run. */
int sgm_hash_helpers(int wanted) {
	if (!supported) return 0;
	pthread_mutex_lock(&start_lock);
	while (helpers < wanted) {
		pthread_t thread;
		pthread_attr_t attr;
		pthread_attr_init(&attr);
		pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
		int failed = pthread_create(&thread, &attr, helper, NULL);
		pthread_attr_destroy(&attr);
		if (failed) break;
		helpers++;
	}
	int running = helpers;
	pthread_mutex_unlock(&start_lock);
	return running;
}

/* As sgm_sha256_pages_at, with the helpers claiming groups beside the caller. */
int sgm_sha256_pages_at_shared(const uint8_t *base, const uint32_t *offsets, uint32_t count, uint8_t *digests) {
	if (!supported) return -1;
	uint32_t groups = (count + LANES - 1) / LANES;
	if (groups < 2 || groups > 0xffff || atomic_load_explicit(&helpers, memory_order_relaxed) == 0 || atomic_flag_test_and_set_explicit(&busy, memory_order_acquire)) {
		return sgm_sha256_pages_at(base, offsets, count, digests);
	}
	uint32_t number = atomic_load_explicit(&call_number, memory_order_relaxed) + 1;
	if (number == 0) number = 1; /* 0 is what a helper has seen before its first call */
	__atomic_store_n(&call.base, base, __ATOMIC_RELAXED);
	__atomic_store_n(&call.offsets, offsets, __ATOMIC_RELAXED);
	__atomic_store_n(&call.count, count, __ATOMIC_RELAXED);
	__atomic_store_n(&call.digests, digests, __ATOMIC_RELAXED);
	atomic_store_explicit(&groups_done, 0, memory_order_relaxed);
	atomic_store_explicit(&ticket, TICKET(number, groups, 0), memory_order_release);
	atomic_store_explicit(&call_number, number, memory_order_release);
	futex_wake(&call_number, INT32_MAX);
	claim_groups(number, 0);
	/* a helper that claimed a group and lost its core holds the call until it runs again */
	for (int spins = 0;;) {
		uint32_t done = atomic_load_explicit(&groups_done, memory_order_acquire);
		if (done == groups) break;
		if (spins < 256) {
			spins++;
			_mm_pause();
		} else futex_wait(&groups_done, done);
	}
	atomic_flag_clear_explicit(&busy, memory_order_release);
	return 0;
}

/* Pages the helpers have hashed since the process began. */
uint64_t sgm_hash_helper_pages(void) { return atomic_load_explicit(&helper_pages, memory_order_relaxed); }
