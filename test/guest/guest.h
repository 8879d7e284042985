/* Shared by the test guest's files: types, serial output, and the write
 * discipline that keeps QEMU 7.2's TCG from losing a tracked write (see
 * invlpg in guest.c). */
typedef unsigned int u32;
typedef unsigned long long u64;

#define PAGE 4096u

void puts_(const char *s);
void putdec(u32 v);
void puthex(u32 v);
u32 mix(u32 x);

static inline void invlpg(const void *p) {
	__asm__ volatile("invlpg (%0)" : : "r"(p) : "memory");
}

/* churn.c: a region whose pages change the way real memory does */
void churn_init(u32 *region, u32 pages, u32 *table, u32 seed);
void churn_one(void);
u32 churn_verify(void);
void churn_corrupt(void);
