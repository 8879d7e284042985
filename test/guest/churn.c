/*
 * The test guest's churn region: pages that hold contents the way real
 * memory does. Each page holds a content id's bytes (id 0: the zero page),
 * the same id being the same bytes on every page and, for shared ids, in
 * every VM; a table after the region records each page's id and the churn
 * step that last wrote it:
 *   table[2p] = content id, table[2p + 1] = version (step number)
 * Churn steps write hot content on many pages, fresh content, copy a page's
 * content to another, swap two pages, zero a page, make a content vanish
 * from every page and, later, come back.
 *
 * Every write is made twice around invlpg, as in guest.c, and the page
 * before its table entry: a VM stopped between the two has a page newer
 * than its entry, which the destination then completes.
 */
#include "guest.h"

#define SHARED_IDS 256u /* ids 1..256: the same bytes in every VM */
#define POOL 32u
#define GRAVE 32u

static u32 *region, *table;
static u32 npages, seed, version, next_fresh;
static u32 pool[POOL];
static u32 grave[GRAVE], graves;
static u32 rng; /* in .bss, with the scratch the memory proof leaves out */

static u32 next(void) {
	rng ^= rng << 13;
	rng ^= rng >> 17;
	rng ^= rng << 5;
	return rng;
}
static u32 below(u32 n) { return next() % n; }

static u32 salt_of(u32 id) { return id <= SHARED_IDS ? 0 : seed; }

/* Word w of content id's page (id != 0). */
static u32 content_word(u32 id, u32 w) {
	if (w == 0) return id;
	if (w == 1) return salt_of(id);
	return mix(id * 0x9e3779b9u ^ salt_of(id) ^ mix(w));
}

static void fill(u32 *page, u32 id) {
	if (id == 0) {
		for (u32 w = 0; w < PAGE / 4; w++) page[w] = 0;
		return;
	}
	for (u32 w = 0; w < PAGE / 4; w++) page[w] = content_word(id, w);
}

static void set_page(u32 p, u32 id) {
	u32 *page = region + p * (PAGE / 4);
	invlpg(page);
	fill(page, id);
	invlpg(page);
	fill(page, id);
	u32 *entry = table + 2 * p;
	version++;
	invlpg(entry);
	entry[0] = id;
	entry[1] = version;
	invlpg(entry);
	entry[0] = id;
	entry[1] = version;
}

static u32 fresh(void) { return SHARED_IDS + 1 + next_fresh++; }

void churn_init(u32 *r, u32 pages, u32 *t, u32 s) {
	region = r;
	npages = pages;
	table = t;
	seed = s;
	rng = 2463534242u ^ mix(seed);
	for (u32 k = 0; k < POOL; k++) pool[k] = k < POOL / 2 ? 1 + k : fresh();
	/* a quarter shared with every VM, a quarter hot, a quarter unique, a quarter zero */
	for (u32 p = 0; p < npages; p++) {
		u32 id = p % 4 == 0 ? 1 + below(SHARED_IDS) : p % 4 == 1 ? pool[below(POOL)] : p % 4 == 2 ? fresh() : 0;
		set_page(p, id);
	}
}

void churn_one(void) {
	if (npages < 2) return;
	u32 p = below(npages), q = below(npages);
	u32 r = below(100);
	if (r < 30) {
		set_page(p, pool[below(POOL)]);
	} else if (r < 38) {
		set_page(p, fresh());
	} else if (r < 53) {
		set_page(p, table[2 * q]); /* q's content, now on p too */
	} else if (r < 63) {
		u32 a = table[2 * p], b = table[2 * q];
		set_page(p, b);
		set_page(q, a);
	} else if (r < 75) {
		set_page(p, 0);
	} else if (r < 88 && graves > 0) {
		set_page(p, grave[below(graves)]); /* back after vanishing everywhere */
	} else if (r < 89) {
		u32 id = table[2 * p];
		if (id == 0) return;
		for (u32 i = 0; i < npages; i++)
			if (table[2 * i] == id) set_page(i, fresh());
		for (u32 k = 0; k < POOL; k++)
			if (pool[k] == id) pool[k] = fresh();
		if (graves < GRAVE) grave[graves++] = id;
		else grave[below(GRAVE)] = id;
	} else {
		set_page(p, 1 + below(SHARED_IDS));
	}
}

u32 churn_verify(void) {
	u32 bad = 0;
	for (u32 p = 0; p < npages; p++) {
		const u32 *page = region + p * (PAGE / 4);
		u32 id = table[2 * p];
		int ok = 1;
		for (u32 w = 0; ok && w < PAGE / 4; w++) ok = page[w] == (id ? content_word(id, w) : 0);
		if (ok) continue;
		if (bad < 8) {
			puts_("SGMGUEST bad churn page=");
			putdec(p);
			puts_(" want=");
			putdec(id);
			puts_(" has=");
			putdec(page[0]);
			puts_("\n");
		}
		bad++;
	}
	return bad;
}

/* A wrong page, for the test that proves verify and the memory proof notice one. */
void churn_corrupt(void) {
	u32 *page = region + (npages / 2) * (PAGE / 4);
	invlpg(page);
	page[100] ^= 1;
	invlpg(page);
	page[100] = page[100];
}
