/*
 * sgm churn: a process whose memory behaves like a real guest's, for the
 * Linux test guest. It keeps a region of pages whose contents repeat within
 * the VM and across VMs (shared content ids are the same in every VM),
 * move between pages, swap, go to zero (written or freed) and back, and
 * vanish from every page to reappear later, while it checks every page
 * against what it last wrote there.
 *
 *   churn MIB SEED OPS_PER_SECOND
 *
 * A page holding content id c starts with (MAGIC, c, salt) and continues
 * with bytes derived from (c, salt) alone; salt is 0 for shared content and
 * the VM's seed otherwise; id 0 is the zero page. On a wrong page it prints
 * what it found, so a stale or misplaced page can be told apart.
 *
 * Output (to the console): "SGMCHURN filled ...", one "SGMCHURN sweep=N ok"
 * per full check of every page, "SGMCHURN BAD ..." for each wrong page,
 * with the guest-physical frame its page table maps it to (pagemap): the
 * shared zero page's (printed at the start) if the page-table entry was
 * empty, so that a lost page-table write tells itself apart from a stale
 * data page, which a memory dump then shows.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define MAGIC 0x4e524843u /* "CHRN" */
#define SHARED_IDS 512u   /* ids 1..512: the same content in every VM */
#define POOL 48u          /* hot content ids written again and again */
#define GRAVE 64u         /* ids vanished from every page, to come back */

static uint8_t *mem;
static uint32_t npages, seed;
static uint32_t *want; /* content id each page must hold */
static uint32_t next_fresh;
static uint32_t pool[POOL];
static uint32_t grave[GRAVE], graves;
static uint64_t rng = 88172645463325252ull;

static uint64_t next(void) {
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}
static uint32_t below(uint32_t n) { return (uint32_t)(next() % n); }

static uint32_t salt_of(uint32_t id) { return id <= SHARED_IDS ? 0 : seed; }

static void generate(uint32_t id, uint32_t *out) {
	if (id == 0) {
		memset(out, 0, PAGE);
		return;
	}
	uint32_t salt = salt_of(id);
	uint64_t x = ((uint64_t)id << 32 ^ salt ^ 0x9e3779b97f4a7c15ull) | 1;
	out[0] = MAGIC;
	out[1] = id;
	out[2] = salt;
	out[3] = 0;
	for (uint32_t w = 4; w < PAGE / 4; w += 2) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		out[w] = (uint32_t)x;
		out[w + 1] = (uint32_t)(x >> 32);
	}
}

static uint8_t *page(uint32_t p) { return mem + (size_t)p * PAGE; }

/* The frame `addr` is mapped to, from /proc/self/pagemap; 0 if none (or no pagemap). */
static uint64_t frame_of(const void *addr) {
	static int fd = -2;
	if (fd == -2) fd = open("/proc/self/pagemap", O_RDONLY);
	uint64_t entry = 0;
	if (fd < 0 || pread(fd, &entry, sizeof entry, (off_t)((uintptr_t)addr / PAGE * sizeof entry)) != sizeof entry) return 0;
	return entry >> 63 ? entry & ((1ull << 55) - 1) : 0;
}

static void put(uint32_t p, uint32_t id) {
	generate(id, (uint32_t *)page(p));
	want[p] = id;
}

static uint32_t fresh(void) { return SHARED_IDS + 1 + next_fresh++; }

static uint32_t bad_total;

static void check(uint32_t p, uint32_t sweep) {
	static uint32_t expect[PAGE / 4];
	generate(want[p], expect);
	if (memcmp(expect, page(p), PAGE) == 0) return;
	const uint32_t *got = (const uint32_t *)page(p);
	int intact = 0;
	if (got[0] == MAGIC) {
		static uint32_t other[PAGE / 4];
		generate(got[1], other);
		intact = got[2] == salt_of(got[1]) && memcmp(other, got, PAGE) == 0;
	}
	int zero = 1;
	for (uint32_t w = 0; w < PAGE / 4 && zero; w++) zero = got[w] == 0;
	printf("SGMCHURN BAD sweep=%u page=%u want=%u got=%s%u%s frame=0x%llx\n", sweep, p, want[p],
	       zero ? "zero:" : got[0] == MAGIC ? "id:" : "garbage:", zero ? 0 : got[0] == MAGIC ? got[1] : got[0],
	       intact || zero ? "" : " (torn)", (unsigned long long)frame_of(page(p)));
	fflush(stdout);
	bad_total++;
	want[p] = 0; /* report each wrong page once */
	memset(page(p), 0, PAGE);
}

/* One change of the kind real memory sees all the time. */
static void churn_one(void) {
	uint32_t p = below(npages), q = below(npages);
	uint32_t r = below(100);
	if (r < 30) {
		put(p, pool[below(POOL)]); /* hot content, on many pages */
	} else if (r < 38) {
		put(p, fresh()); /* content never seen before */
	} else if (r < 53) {
		memcpy(page(p), page(q), PAGE); /* content moves to another page */
		want[p] = want[q];
	} else if (r < 63) {
		static uint8_t tmp[PAGE];
		memcpy(tmp, page(p), PAGE); /* two pages swap */
		memcpy(page(p), page(q), PAGE);
		memcpy(page(q), tmp, PAGE);
		uint32_t t = want[p];
		want[p] = want[q];
		want[q] = t;
	} else if (r < 73) {
		memset(page(p), 0, PAGE); /* written to zero */
		want[p] = 0;
	} else if (r < 78) {
		uint32_t n = 1 + below(16); /* freed: reads as zero, faults back in on the next write */
		if (p + n > npages) n = npages - p;
		madvise(page(p), (size_t)n * PAGE, MADV_DONTNEED);
		for (uint32_t i = 0; i < n; i++) want[p + i] = 0;
	} else if (r < 90 && graves > 0) {
		put(p, grave[below(graves)]); /* content that vanished everywhere comes back */
	} else if (r < 91) {
		/* a content vanishes from every page: overwritten wherever it is */
		uint32_t id = want[p];
		if (id == 0) return;
		for (uint32_t i = 0; i < npages; i++)
			if (want[i] == id) put(i, fresh());
		for (uint32_t k = 0; k < POOL; k++)
			if (pool[k] == id) pool[k] = fresh();
		if (graves < GRAVE) grave[graves++] = id;
		else grave[below(GRAVE)] = id;
	} else {
		put(p, 1 + below(SHARED_IDS)); /* content every VM of the run has */
	}
}

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
	if (argc != 4) {
		fprintf(stderr, "usage: churn MIB SEED OPS_PER_SECOND\n");
		return 2;
	}
	npages = (uint32_t)(atoi(argv[1]) * (1024 * 1024 / PAGE));
	seed = (uint32_t)atoi(argv[2]);
	double rate = atof(argv[3]);
	rng ^= (uint64_t)seed * 0x9e3779b97f4a7c15ull;
	setvbuf(stdout, NULL, _IOLBF, 0);
	mem = mmap(NULL, (size_t)npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	want = calloc(npages, sizeof *want);
	if (mem == MAP_FAILED || !want) {
		printf("SGMCHURN error no memory for %u pages\n", npages);
		return 1;
	}
	for (uint32_t k = 0; k < POOL; k++) pool[k] = k < POOL / 2 ? 1 + k : fresh();
	/* the start: a quarter shared, a quarter hot, a quarter unique, a quarter zero */
	for (uint32_t p = 0; p < npages; p++) {
		switch (p % 4) {
		case 0: put(p, 1 + below(SHARED_IDS)); break;
		case 1: put(p, pool[below(POOL)]); break;
		case 2: put(p, fresh()); break;
		default: memset(page(p), 0, PAGE); want[p] = 0;
		}
	}
	/* a page never written, read once: mapped to the shared zero page */
	const volatile uint8_t *untouched = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t zero_frame = untouched != MAP_FAILED && untouched[0] == 0 ? frame_of((const void *)untouched) : 0;
	printf("SGMCHURN filled pages=%u seed=%u rate=%.0f zero-frame=0x%llx\n", npages, seed, rate, (unsigned long long)zero_frame);
	uint32_t sweep = 0, at = 0;
	uint64_t ops = 0;
	double start = now(), credit = 0, last = start;
	for (;;) {
		double t = now();
		credit += (t - last) * rate;
		last = t;
		if (credit > rate / 10) credit = rate / 10; /* after a stall, catch up at most 100 ms */
		for (; credit >= 1; credit -= 1, ops++) churn_one();
		/* check a slice of pages every round: a full sweep every few seconds */
		for (uint32_t n = 0; n < 256; n++) {
			check(at, sweep);
			if (++at == npages) {
				at = 0;
				printf("SGMCHURN sweep=%u %s ops=%llu bad=%u\n", sweep, bad_total ? "BAD" : "ok", (unsigned long long)ops, bad_total);
				sweep++;
			}
		}
		struct timespec nap = {0, 2000000};
		nanosleep(&nap, NULL);
	}
}
