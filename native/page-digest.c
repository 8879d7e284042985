/* BLAKE3 of 4 KiB pages: the page digest, the content address under which
 * identical pages from any VM are stored and sent once.
 *
 * sgm hashes every page it moves, in each role, so the digest is among its
 * largest costs. SHA-256 went sixteen pages side by side in AVX-512 lanes
 * at 3.6 GB/s a core here (the CPU's SHA extensions, one page at a time:
 * 1.6); BLAKE3 goes the same way at 6.6 to 7.2, its rounds being cheaper
 * arithmetic (README, Choices). Both are cryptographic, which a page digest
 * must be: guests choose their page contents.
 *
 * A page is four 1 KiB chunks, each compressed block by block, and a tree
 * of three parents over their chaining values, the last the root. Sixteen
 * pages go side by side, page i in lane i of AVX-512 registers: every lane
 * compresses the same chunk and block of its own page at once, and the
 * parents take their message words straight from the chaining values'
 * registers; eight the same way in AVX2's registers where the CPU lacks
 * AVX-512. For one page, or where the CPU has neither, the four chunks of
 * one page go side by side in 128-bit lanes (any x86-64), the parents one
 * at a time. test/dedup.test.ts checks every kernel against blake3-wasm,
 * an implementation of its own.
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
#define CHUNK_BYTES 1024
#define CHUNKS (PAGE_BYTES / CHUNK_BYTES)
#define BLOCKS (CHUNK_BYTES / 64)
#define LANES 16

enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

static const uint32_t IV[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

/* The message words each round takes, in order: the identity, then each
 * row the row before through BLAKE3's permutation (2 6 3 10 7 0 4 13 1 11
 * 12 5 9 14 15 8). */
static const uint8_t SCHEDULE[7][16] = {
	{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
	{2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
	{3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
	{10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
	{12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
	{9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
	{11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

/* Pages side by side, as the CPU allows: 16 (AVX-512), 8 (AVX2) or 1; and
 * the kernel for one page. Set before any thread hashes. */
static int lanes;
static void (*page_kernel)(const uint8_t *page, uint8_t *out);

/* BLAKE3's seven rounds over the state v0 .. v15 and the message m[16],
 * with the G of a kernel's width: the columns, then the diagonals, each
 * round taking the message words in its row of SCHEDULE. Every kernel runs
 * these, so the order is written once. */
#define ROUNDS(G)                                                 \
	_Pragma("GCC unroll 7") for (int r = 0; r < 7; r++) {     \
		const uint8_t *s = SCHEDULE[r];                   \
		G(v0, v4, v8, v12, m[s[0]], m[s[1]]);             \
		G(v1, v5, v9, v13, m[s[2]], m[s[3]]);             \
		G(v2, v6, v10, v14, m[s[4]], m[s[5]]);            \
		G(v3, v7, v11, v15, m[s[6]], m[s[7]]);            \
		G(v0, v5, v10, v15, m[s[8]], m[s[9]]);            \
		G(v1, v6, v11, v12, m[s[10]], m[s[11]]);          \
		G(v2, v7, v8, v13, m[s[12]], m[s[13]]);           \
		G(v3, v4, v9, v14, m[s[14]], m[s[15]]);           \
	}

/* The chaining value, the state's halves XORed, into cv[0 .. 8). */
#define CHAINING(XOR) \
	(cv[0] = XOR(v0, v8), cv[1] = XOR(v1, v9), cv[2] = XOR(v2, v10), cv[3] = XOR(v3, v11), \
	 cv[4] = XOR(v4, v12), cv[5] = XOR(v5, v13), cv[6] = XOR(v6, v14), cv[7] = XOR(v7, v15))
#define XOR_PLAIN(a, b) ((a) ^ (b))

/* ---- a parent, one at a time ---- */

static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

#define G1(a, b, c, d, x, y)                  \
	do {                                  \
		a = a + b + (x);              \
		d = rotr(d ^ a, 16);          \
		c = c + d;                    \
		b = rotr(b ^ c, 12);          \
		a = a + b + (y);              \
		d = rotr(d ^ a, 8);           \
		c = c + d;                    \
		b = rotr(b ^ c, 7);           \
	} while (0)

static void compress1(uint32_t cv[8], const uint32_t m[16], uint32_t counter, uint32_t flags) {
	uint32_t v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
	uint32_t v8 = IV[0], v9 = IV[1], v10 = IV[2], v11 = IV[3], v12 = counter, v13 = 0, v14 = 64, v15 = flags;
	ROUNDS(G1);
	CHAINING(XOR_PLAIN);
}

/* ---- one page, its four chunks side by side in 32-bit lanes (any x86-64) ---- */

typedef uint32_t u32x4 __attribute__((vector_size(16)));

static inline u32x4 rot4(u32x4 x, int n) { return (x >> n) | (x << (32 - n)); }

#define G4(a, b, c, d, x, y)                  \
	do {                                  \
		a = a + b + (x);              \
		d = rot4(d ^ a, 16);          \
		c = c + d;                    \
		b = rot4(b ^ c, 12);          \
		a = a + b + (y);              \
		d = rot4(d ^ a, 8);           \
		c = c + d;                    \
		b = rot4(b ^ c, 7);           \
	} while (0)

static inline u32x4 splat4(uint32_t x) { return (u32x4){x, x, x, x}; }

__attribute__((always_inline)) static inline void hash_page(const uint8_t *page, uint8_t *out) {
	u32x4 cv[8], m[16];
	for (int k = 0; k < 8; k++) cv[k] = splat4(IV[k]);
	for (int b = 0; b < BLOCKS; b++) {
		for (int j = 0; j < 4; j++) {
			/* words 4j .. 4j + 3 of the four chunks, rows to columns */
			const uint8_t *at = page + b * 64 + j * 16;
			__m128i r0 = _mm_loadu_si128((const __m128i *)at), r1 = _mm_loadu_si128((const __m128i *)(at + CHUNK_BYTES));
			__m128i r2 = _mm_loadu_si128((const __m128i *)(at + 2 * CHUNK_BYTES)), r3 = _mm_loadu_si128((const __m128i *)(at + 3 * CHUNK_BYTES));
			__m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpackhi_epi32(r0, r1);
			__m128i t2 = _mm_unpacklo_epi32(r2, r3), t3 = _mm_unpackhi_epi32(r2, r3);
			m[4 * j] = (u32x4)_mm_unpacklo_epi64(t0, t2), m[4 * j + 1] = (u32x4)_mm_unpackhi_epi64(t0, t2);
			m[4 * j + 2] = (u32x4)_mm_unpacklo_epi64(t1, t3), m[4 * j + 3] = (u32x4)_mm_unpackhi_epi64(t1, t3);
		}
		u32x4 v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
		u32x4 v8 = splat4(IV[0]), v9 = splat4(IV[1]), v10 = splat4(IV[2]), v11 = splat4(IV[3]);
		u32x4 v12 = (u32x4){0, 1, 2, 3}, v13 = splat4(0), v14 = splat4(64);
		u32x4 v15 = splat4((b == 0 ? CHUNK_START : 0) | (b == BLOCKS - 1 ? CHUNK_END : 0));
		ROUNDS(G4);
		CHAINING(XOR_PLAIN);
	}
	uint32_t pm[16], left[8], right[8], root[8];
	memcpy(left, IV, sizeof IV), memcpy(right, IV, sizeof IV), memcpy(root, IV, sizeof IV);
	for (int k = 0; k < 8; k++) pm[k] = cv[k][0], pm[8 + k] = cv[k][1];
	compress1(left, pm, 0, PARENT);
	for (int k = 0; k < 8; k++) pm[k] = cv[k][2], pm[8 + k] = cv[k][3];
	compress1(right, pm, 0, PARENT);
	memcpy(pm, left, 32), memcpy(pm + 8, right, 32);
	compress1(root, pm, 0, PARENT | ROOT);
	memcpy(out, root, 32);
}

/* The same, compiled twice: with AVX-512VL's rotations where the CPU has them, else SSE2's shifts. */
__attribute__((target("avx512f,avx512vl"))) static void hash_page_avx512vl(const uint8_t *page, uint8_t *out) { hash_page(page, out); }
static void hash_page_sse2(const uint8_t *page, uint8_t *out) { hash_page(page, out); }

/* ---- AVX-512: sixteen pages, one in each 32-bit lane ---- */

#define AVX512 __attribute__((target("avx512f,avx512bw")))

#define G16(a, b, c, d, x, y)                                          \
	do {                                                           \
		a = _mm512_add_epi32(_mm512_add_epi32(a, b), x);       \
		d = _mm512_ror_epi32(_mm512_xor_si512(d, a), 16);      \
		c = _mm512_add_epi32(c, d);                            \
		b = _mm512_ror_epi32(_mm512_xor_si512(b, c), 12);      \
		a = _mm512_add_epi32(_mm512_add_epi32(a, b), y);       \
		d = _mm512_ror_epi32(_mm512_xor_si512(d, a), 8);       \
		c = _mm512_add_epi32(c, d);                            \
		b = _mm512_ror_epi32(_mm512_xor_si512(b, c), 7);       \
	} while (0)

AVX512 static inline void compress16(__m512i cv[8], const __m512i m[16], uint32_t counter, uint32_t flags) {
	__m512i v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
	__m512i v8 = _mm512_set1_epi32((int)IV[0]), v9 = _mm512_set1_epi32((int)IV[1]);
	__m512i v10 = _mm512_set1_epi32((int)IV[2]), v11 = _mm512_set1_epi32((int)IV[3]);
	__m512i v12 = _mm512_set1_epi32((int)counter), v13 = _mm512_setzero_si512();
	__m512i v14 = _mm512_set1_epi32(64), v15 = _mm512_set1_epi32((int)flags);
	ROUNDS(G16);
	CHAINING(_mm512_xor_si512);
}

/* Rows r[i] (lane i's sixteen words) become columns w[j] (word j of every lane). */
AVX512 static void transpose16(const __m512i r[16], __m512i w[16]) {
	__m512i t[16], u[16];
	for (int i = 0; i < 8; i++) {
		t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
		t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
	}
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

AVX512 static void hash16(const uint8_t *const p[16], uint8_t *const out[16]) {
	__m512i cvs[CHUNKS][8], rows[16], m[16];
	for (int c = 0; c < CHUNKS; c++) {
		for (int k = 0; k < 8; k++) cvs[c][k] = _mm512_set1_epi32((int)IV[k]);
		for (int b = 0; b < BLOCKS; b++) {
			for (int i = 0; i < 16; i++) rows[i] = _mm512_loadu_si512(p[i] + c * CHUNK_BYTES + b * 64);
			transpose16(rows, m);
			compress16(cvs[c], m, (uint32_t)c, (b == 0 ? CHUNK_START : 0) | (b == BLOCKS - 1 ? CHUNK_END : 0));
		}
	}
	__m512i left[8], right[8], root[8];
	for (int k = 0; k < 8; k++) left[k] = right[k] = root[k] = _mm512_set1_epi32((int)IV[k]);
	for (int k = 0; k < 8; k++) m[k] = cvs[0][k], m[8 + k] = cvs[1][k];
	compress16(left, m, 0, PARENT);
	for (int k = 0; k < 8; k++) m[k] = cvs[2][k], m[8 + k] = cvs[3][k];
	compress16(right, m, 0, PARENT);
	for (int k = 0; k < 8; k++) m[k] = left[k], m[8 + k] = right[k];
	compress16(root, m, 0, PARENT | ROOT);
	uint32_t words[8][16] __attribute__((aligned(64)));
	for (int k = 0; k < 8; k++) _mm512_store_si512(words[k], root[k]);
	for (int i = 0; i < 16; i++) {
		uint32_t digest[8];
		for (int k = 0; k < 8; k++) digest[k] = words[k][i];
		memcpy(out[i], digest, sizeof digest);
	}
}

/* ---- AVX2: eight pages, one in each 32-bit lane ---- */

#define AVX2 __attribute__((target("avx2")))

/* rotations by whole bytes as byte shuffles; AVX2 has no rotate */
#define ROT16_8(x) _mm256_shuffle_epi8((x), _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13))
#define ROT8_8(x) _mm256_shuffle_epi8((x), _mm256_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12))
#define ROTN_8(x, n) _mm256_or_si256(_mm256_srli_epi32((x), (n)), _mm256_slli_epi32((x), 32 - (n)))

#define G8(a, b, c, d, x, y)                                           \
	do {                                                           \
		a = _mm256_add_epi32(_mm256_add_epi32(a, b), x);       \
		d = ROT16_8(_mm256_xor_si256(d, a));                   \
		c = _mm256_add_epi32(c, d);                            \
		b = ROTN_8(_mm256_xor_si256(b, c), 12);                \
		a = _mm256_add_epi32(_mm256_add_epi32(a, b), y);       \
		d = ROT8_8(_mm256_xor_si256(d, a));                    \
		c = _mm256_add_epi32(c, d);                            \
		b = ROTN_8(_mm256_xor_si256(b, c), 7);                 \
	} while (0)

AVX2 static inline void compress8(__m256i cv[8], const __m256i m[16], uint32_t counter, uint32_t flags) {
	__m256i v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3], v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
	__m256i v8 = _mm256_set1_epi32((int)IV[0]), v9 = _mm256_set1_epi32((int)IV[1]);
	__m256i v10 = _mm256_set1_epi32((int)IV[2]), v11 = _mm256_set1_epi32((int)IV[3]);
	__m256i v12 = _mm256_set1_epi32((int)counter), v13 = _mm256_setzero_si256();
	__m256i v14 = _mm256_set1_epi32(64), v15 = _mm256_set1_epi32((int)flags);
	ROUNDS(G8);
	CHAINING(_mm256_xor_si256);
}

/* Rows r[i] (lane i's eight words) become columns w[j] (word j of every lane). */
AVX2 static void transpose8(const __m256i r[8], __m256i w[8]) {
	__m256i t[8], u[8];
	for (int i = 0; i < 4; i++) {
		t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
		t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
	}
	/* u[4i+m], 128-bit lane k: rows 4i..4i+3, word 4k+m */
	for (int i = 0; i < 2; i++) {
		u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
		u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
		u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
		u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
	}
	for (int m = 0; m < 4; m++) {
		w[m] = _mm256_permute2x128_si256(u[m], u[4 + m], 0x20);
		w[4 + m] = _mm256_permute2x128_si256(u[m], u[4 + m], 0x31);
	}
}

AVX2 static void hash8(const uint8_t *const p[8], uint8_t *const out[8]) {
	__m256i cvs[CHUNKS][8], rows[8], m[16];
	for (int c = 0; c < CHUNKS; c++) {
		for (int k = 0; k < 8; k++) cvs[c][k] = _mm256_set1_epi32((int)IV[k]);
		for (int b = 0; b < BLOCKS; b++) {
			for (int half = 0; half < 2; half++) {
				for (int i = 0; i < 8; i++) rows[i] = _mm256_loadu_si256((const __m256i *)(p[i] + c * CHUNK_BYTES + b * 64 + half * 32));
				transpose8(rows, m + 8 * half);
			}
			compress8(cvs[c], m, (uint32_t)c, (b == 0 ? CHUNK_START : 0) | (b == BLOCKS - 1 ? CHUNK_END : 0));
		}
	}
	__m256i left[8], right[8], root[8];
	for (int k = 0; k < 8; k++) left[k] = right[k] = root[k] = _mm256_set1_epi32((int)IV[k]);
	for (int k = 0; k < 8; k++) m[k] = cvs[0][k], m[8 + k] = cvs[1][k];
	compress8(left, m, 0, PARENT);
	for (int k = 0; k < 8; k++) m[k] = cvs[2][k], m[8 + k] = cvs[3][k];
	compress8(right, m, 0, PARENT);
	for (int k = 0; k < 8; k++) m[k] = left[k], m[8 + k] = right[k];
	compress8(root, m, 0, PARENT | ROOT);
	uint32_t words[8][8] __attribute__((aligned(32)));
	for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i *)words[k], root[k]);
	for (int i = 0; i < 8; i++) {
		uint32_t digest[8];
		for (int k = 0; k < 8; k++) digest[k] = words[k][i];
		memcpy(out[i], digest, sizeof digest);
	}
}

/* Before any thread can call in: digest threads load the library too. */
__attribute__((constructor)) static void init(void) {
	__builtin_cpu_init();
	int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
	lanes = avx512 ? 16 : __builtin_cpu_supports("avx2") ? 8 : 1;
	page_kernel = avx512 && __builtin_cpu_supports("avx512vl") ? hash_page_avx512vl : hash_page_sse2;
}

/* Pages first + 0 .. first + 15 of a call (fewer at its end: lanes past the
 * last page hash it again, into a spare digest). */
static void hash_group(const uint8_t *base, const uint32_t *offsets, uint32_t count, uint8_t *digests, uint32_t first) {
	if (lanes == 1) {
		for (uint32_t n = first; n < count && n < first + LANES; n++) page_kernel(base + offsets[n], digests + (uint64_t)n * 32);
		return;
	}
	uint8_t spare[LANES][32];
	const uint8_t *p[LANES];
	uint8_t *out[LANES];
	for (uint32_t i = 0; i < LANES; i++) {
		uint32_t n = first + i < count ? first + i : count - 1;
		p[i] = base + offsets[n];
		out[i] = first + i < count ? digests + (uint64_t)n * 32 : spare[i];
	}
	if (lanes == 16) hash16(p, out);
	else hash8(p, out), hash8(p + 8, out + 8);
}

/* Digest of the page at `page` to out[0 .. 32). */
void sgm_digest_page(const uint8_t *page, uint8_t *out) { page_kernel(page, out); }

/* Digests of `count` pages, page n at base + offsets[n], to digests[32 n ..].
 * The caller has checked that every page lies within its buffer. */
void sgm_digest_pages_at(const uint8_t *base, const uint32_t *offsets, uint32_t count, uint8_t *digests) {
	for (uint32_t first = 0; first < count; first += LANES) hash_group(base, offsets, count, digests, first);
}

/* The kernels any x86-64 runs, one page at a time, from now on: for
 * measuring what the others save, and to test these where the CPU has
 * them (SGM_NATIVE_DIGEST=0). Called before any hashing. */
void sgm_digest_narrow(void) {
	lanes = 1;
	page_kernel = hash_page_sse2;
}

/* Eight pages at a time at most, where the CPU does sixteen: to test the
 * AVX2 kernel here (SGM_NATIVE_DIGEST=8). Called before any hashing. */
void sgm_digest_at_most_eight(void) {
	if (lanes > 8) lanes = 8;
}

/* How many pages go side by side: 16, 8 or 1. */
int sgm_digest_lanes(void) { return lanes; }

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

/* As sgm_digest_pages_at, with the helpers claiming groups beside the caller. */
void sgm_digest_pages_at_shared(const uint8_t *base, const uint32_t *offsets, uint32_t count, uint8_t *digests) {
	uint32_t groups = (count + LANES - 1) / LANES;
	if (groups < 2 || groups > 0xffff || atomic_load_explicit(&helpers, memory_order_relaxed) == 0 || atomic_flag_test_and_set_explicit(&busy, memory_order_acquire)) {
		sgm_digest_pages_at(base, offsets, count, digests);
		return;
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
}

/* Pages the helpers have hashed since the process began. */
uint64_t sgm_hash_helper_pages(void) { return atomic_load_explicit(&helper_pages, memory_order_relaxed); }
