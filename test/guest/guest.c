/*
 * sgm test guest: a freestanding multiboot program that fills every page of
 * its RAM above 2 MiB with content derived from the page's address and a
 * seed, then dirties pages at a set rate until told over COM1 to halt.
 *
 * Command line (multiboot, QEMU -append): seed=N rate=PAGES_PER_SECOND churn=STEPS_PER_SECOND
 *
 * Every data page starts with a header that the guest and the test bench
 * can both check without any other state:
 *   w0 magic, w1 page frame number, w2 version, w3 seed,
 *   w4/w5 TSC at the write (0 for the initial fill), w6 check word
 * and a body that depends on (seed, frame) only. A write ("dirtying")
 * rewrites the header with the next version and a fresh TSC stamp, so a
 * page that the migration lost, or delivered in an old version, shows up
 * as a bad check word, a zero page, or a version behind the counter.
 *
 * Pages are dirtied in a fixed permutation (frame = start + k*step mod n),
 * so the version every page must have follows from (pass, pos) alone.
 *
 * The last quarter of the data pages, and a table after them, are the churn
 * region (churn.c): contents that repeat, move, vanish and come back, as in
 * real memory, changed churn=N times a second.
 *
 * Serial commands (one byte): 'h' stop dirtying, verify all pages, halt;
 * 'v' verify and go on; 's' print counters; 'x' spoil one churn page (for
 * the test that proves a wrong page is noticed).
 *
 * Between timer ticks (1 kHz) and serial input the guest sleeps in HLT, so an
 * idle guest costs the host no CPU, as a real idle VM would not.
 */
#include "guest.h"

#define DATA_START 0x200000u
#define MAGIC 0x50474d53u /* "SGMP" */
#define PIT_HZ 1193182u

extern char scratch_start[], scratch_end[];

static inline void outb(unsigned short port, unsigned char v) {
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline unsigned char inb(unsigned short port) {
	unsigned char v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
/* QEMU's TCG logs a guest write for migration only when it refills the TLB
 * entry of the page (a migration bitmap sync does not reset TLB entries),
 * and it marks the page dirty just before the store lands, so a sync in
 * between sends the page without it. Either way a page can reach the
 * destination stale, even in QEMU's own migration. The guest therefore
 * drops the TLB entry before a tracked write and, after it, drops it again
 * and writes the same values once more: that second write is logged after
 * the first has landed, and changes nothing if it races a sync itself. */
static inline u64 rdtsc(void) {
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* ---- serial (COM1) ---- */
static void serial_init(void) {
	outb(0x3f9, 0x00);
	outb(0x3fb, 0x80);
	outb(0x3f8, 0x01);
	outb(0x3f9, 0x00);
	outb(0x3fb, 0x03);
	outb(0x3fa, 0xc7);
	outb(0x3fc, 0x0b);
}
static void putc_(char c) {
	while (!(inb(0x3fd) & 0x20)) {
	}
	outb(0x3f8, (unsigned char)c);
}
void puts_(const char *s) {
	while (*s) putc_(*s++);
}
void putdec(u32 v) {
	char b[12];
	int i = 0;
	do {
		b[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i) putc_(b[--i]);
}
void puthex(u32 v) {
	puts_("0x");
	for (int s = 28; s >= 0; s -= 4) putc_("0123456789abcdef"[(v >> s) & 15]);
}

/* ---- interrupts: PIT at 1 kHz on IRQ0, COM1 receive on IRQ4 ---- */
#define TICK_HZ 1000u
struct idt_entry {
	unsigned short offset_lo, selector;
	unsigned char zero, type;
	unsigned short offset_hi;
} __attribute__((packed));
struct idt_descriptor {
	unsigned short limit;
	u32 base;
} __attribute__((packed));

extern void irq_timer(void), irq_serial(void), irq_ignore(void);
/* a page of its own: only interrupt delivery reads it, under QEMU's big
 * lock, so a test that withholds it blocks QEMU's main loop for certain */
static union {
	struct idt_entry e[256];
	unsigned char page[4096];
} idt __attribute__((aligned(4096)));
static volatile u32 ticks;
static volatile unsigned char rx[64];
static volatile u32 rx_head, rx_tail;

void on_timer(void) { ticks++; }
void on_serial(void) {
	while (inb(0x3fd) & 0x01) {
		unsigned char c = inb(0x3f8);
		if (rx_head - rx_tail < sizeof rx) rx[rx_head++ % sizeof rx] = c;
	}
}
static int next_command(void) {
	if (rx_tail == rx_head) return -1;
	return rx[rx_tail++ % sizeof rx];
}

static void set_gate(int vector, void (*handler)(void)) {
	u32 a = (u32)handler;
	idt.e[vector] = (struct idt_entry){(unsigned short)a, 0x08, 0, 0x8e, (unsigned short)(a >> 16)};
}

static void interrupts_init(void) {
	for (int v = 0; v < 256; v++) set_gate(v, irq_ignore);
	set_gate(0x20, irq_timer);
	set_gate(0x24, irq_serial);
	struct idt_descriptor d = {sizeof idt.e - 1, (u32)idt.e};
	__asm__ volatile("lidt %0" : : "m"(d));
	/* remap the PICs to vectors 0x20..0x2f; unmask IRQ0 and IRQ4 only */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xee);
	outb(0xa1, 0xff);
	/* PIT channel 0: rate generator at TICK_HZ */
	u32 reload = PIT_HZ / TICK_HZ;
	outb(0x43, 0x34);
	outb(0x40, (unsigned char)reload);
	outb(0x40, (unsigned char)(reload >> 8));
	outb(0x3f9, 0x01); /* COM1: interrupt on received data */
}

/* ---- content ---- */
u32 mix(u32 x) {
	x ^= x >> 16;
	x *= 0x7feb352du;
	x ^= x >> 15;
	x *= 0x846ca68bu;
	x ^= x >> 16;
	return x;
}
static u32 body_base(u32 seed, u32 frame) { return mix(seed * 0x9e3779b9u ^ mix(frame)); }
static u32 check_word(u32 frame, u32 version, u32 seed, u32 tlo, u32 thi) {
	return mix(frame ^ mix(version ^ mix(seed ^ mix(tlo ^ mix(thi)))));
}

static u32 seed, rate, churn, ram_end, npages, step, step_inv;
static u32 pass, pos; /* dirtying counter: k = pass * npages + pos */

/* The check word is computed first so the stores run back to back: a VM
 * stopped between two of them (at a TCG block boundary) leaves a torn
 * header in its final memory, which the destination then completes. */
static void write_header(u32 *p, u32 frame, u32 version, u64 tsc) {
	u32 tlo = (u32)tsc, thi = (u32)(tsc >> 32);
	u32 check = check_word(frame, version, seed, tlo, thi);
	p[0] = MAGIC;
	p[1] = frame;
	p[2] = version;
	p[3] = seed;
	p[4] = tlo;
	p[5] = thi;
	p[6] = check;
	p[7] = 0;
}

static void fill(void) {
	for (u32 i = 0; i < npages; i++) {
		u32 frame = DATA_START / PAGE + i;
		u32 *p = (u32 *)(frame * PAGE);
		write_header(p, frame, 0, 0);
		u32 b = body_base(seed, frame);
		for (u32 w = 8; w < PAGE / 4; w++) p[w] = b + w * 0x9e3779b9u;
	}
}

/* (a * b) mod n without 64-bit division (no libgcc in a freestanding build) */
static u32 mulmod(u32 a, u32 b, u32 n) {
	u32 r = 0;
	for (int bit = 31; bit >= 0; bit--) {
		r = r >= n - r ? r - (n - r) : r + r;
		if ((b >> bit) & 1) r = r >= n - a ? r - (n - a) : r + a;
	}
	return r;
}
static u32 gcd(u32 a, u32 b) {
	while (b) {
		u32 t = a % b;
		a = b;
		b = t;
	}
	return a;
}
/* modular inverse of a mod n (gcd 1), extended Euclid on signed 64-bit */
static u32 inverse(u32 a, u32 n) {
	long long t = 0, nt = 1, r = n, nr = a;
	while (nr) {
		long long q = 0, rr = r;
		while (rr >= nr) { /* r / nr by subtraction is fine: tiny loop counts */
			rr -= nr;
			q++;
		}
		long long tmp = t - q * nt;
		t = nt;
		nt = tmp;
		tmp = r - q * nr;
		r = nr;
		nr = tmp;
	}
	if (t < 0) t += n;
	return (u32)t;
}

/* Stack and counters, written without invlpg: each page written once more
 * through a fresh TLB entry, so that a write QEMU 7.2's TCG failed to log
 * is logged now (see invlpg). */
static void relog_scratch(void) {
	for (char *p = scratch_start; p < scratch_end; p += PAGE) {
		invlpg(p);
		*(volatile u32 *)p = *(volatile u32 *)p;
	}
}

static void dirty_one(void) {
	u32 idx = mulmod(pos, step, npages);
	u32 frame = DATA_START / PAGE + idx;
	u32 *p = (u32 *)(frame * PAGE);
	u64 tsc = rdtsc();
	invlpg(p);
	write_header(p, frame, pass + 1, tsc);
	invlpg(p);
	write_header(p, frame, pass + 1, tsc);
	if (++pos == npages) {
		pos = 0;
		pass++;
	}
}

/* Version page idx must hold given the counter: one more than the pass if
 * this pass already wrote it. */
static u32 expected_version(u32 idx) {
	u32 k = mulmod(idx, step_inv, npages);
	return pass + (k < pos ? 1 : 0);
}

static u32 verify(void) {
	u32 bad = 0;
	for (u32 i = 0; i < npages; i++) {
		u32 frame = DATA_START / PAGE + i;
		u32 *p = (u32 *)(frame * PAGE);
		u32 want = expected_version(i);
		int ok = p[0] == MAGIC && p[1] == frame && p[2] == want && p[3] == seed &&
			 p[6] == check_word(frame, p[2], seed, p[4], p[5]) && p[7] == 0;
		u32 b = body_base(seed, frame);
		for (u32 w = 8; ok && w < PAGE / 4; w++) ok = p[w] == b + w * 0x9e3779b9u;
		if (!ok) {
			if (bad < 8) {
				puts_("SGMGUEST bad frame=");
				puthex(frame);
				puts_(" version=");
				putdec(p[2]);
				puts_(" want=");
				putdec(want);
				puts_("\n");
			}
			bad++;
		}
	}
	return bad;
}

static void report_counter(const char *what) {
	puts_("SGMGUEST ");
	puts_(what);
	puts_(" pass=");
	putdec(pass);
	puts_(" pos=");
	putdec(pos);
	puts_("\n");
}

static void do_verify(void) {
	u32 bad = verify() + churn_verify();
	if (bad) {
		puts_("SGMGUEST verify bad=");
		putdec(bad);
	} else {
		puts_("SGMGUEST verify ok pages=");
		putdec(npages);
	}
	puts_("\n");
}

static const char *cmdline_value(const char *s, const char *key) {
	while (*s) {
		const char *k = key, *t = s;
		while (*k && *t == *k) {
			k++;
			t++;
		}
		if (!*k && *t == '=') return t + 1;
		while (*s && *s != ' ') s++;
		while (*s == ' ') s++;
	}
	return 0;
}
static u32 parse_u32(const char *s, u32 dflt) {
	if (!s || *s < '0' || *s > '9') return dflt;
	u32 v = 0;
	while (*s >= '0' && *s <= '9') v = v * 10 + (u32)(*s++ - '0');
	return v;
}

struct multiboot_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

void guest_main(u32 magic, struct multiboot_info *mbi) {
	serial_init();
	if (magic != 0x2badb002u || !(mbi->flags & 1)) {
		puts_("SGMGUEST error no multiboot memory info\n");
		return;
	}
	const char *cmd = (mbi->flags & 4) ? (const char *)mbi->cmdline : "";
	seed = parse_u32(cmdline_value(cmd, "seed"), 1);
	rate = parse_u32(cmdline_value(cmd, "rate"), 0);
	churn = parse_u32(cmdline_value(cmd, "churn"), 0);
	ram_end = 0x100000u + mbi->mem_upper * 1024u;
	/* versioned pages, then the churn region, then its table (8 bytes a page) */
	u32 all = (ram_end - DATA_START) / PAGE;
	u32 churn_pages = all / 4;
	u32 table_pages = (churn_pages * 8 + PAGE - 1) / PAGE;
	npages = all - churn_pages - table_pages;
	u32 churn_start = DATA_START + npages * PAGE;
	u32 table_start = churn_start + churn_pages * PAGE;
	if ((u32)scratch_end > DATA_START || ram_end <= DATA_START) {
		puts_("SGMGUEST error layout\n");
		return;
	}
	static const u32 steps[] = {40503u, 48271u, 69621u, 16807u, 7u, 1u};
	for (u32 i = 0; i < sizeof steps / sizeof steps[0]; i++) {
		step = steps[i] % npages;
		if (step && gcd(step, npages) == 1) break;
	}
	step_inv = inverse(step, npages);

	puts_("SGMGUEST boot seed=");
	putdec(seed);
	puts_(" rate=");
	putdec(rate);
	puts_(" data=");
	puthex(DATA_START);
	puts_("-");
	puthex(DATA_START + npages * PAGE);
	puts_(" scratch=");
	puthex((u32)scratch_start);
	puts_("-");
	puthex((u32)scratch_end);
	puts_(" churn=");
	puthex(churn_start);
	puts_("-");
	puthex(table_start);
	puts_(" table=");
	puthex(table_start);
	puts_("-");
	puthex(table_start + table_pages * PAGE);
	puts_("\n");
	fill();
	churn_init((u32 *)churn_start, churn_pages, (u32 *)table_start, seed);
	puts_("SGMGUEST filled pages=");
	putdec(npages);
	puts_("\n");

	interrupts_init();
	u32 seen = 0, credit = 0, churn_credit = 0;
	for (;;) {
		for (char *p = scratch_start; p < scratch_end; p += PAGE) invlpg(p);
		int c = next_command();
		if (c == 'h') break;
		if (c == 'v') do_verify();
		if (c == 's') report_counter("status");
		if (c == 'x') churn_corrupt();
		u32 now = ticks;
		if (now != seen) {
			/* after a long stall, catch up at most 50 ms worth */
			u32 elapsed = now - seen > 50 ? 50 : now - seen;
			seen = now;
			credit += elapsed * rate;
			for (u32 n = 1; credit >= TICK_HZ; n++) {
				credit -= TICK_HZ;
				dirty_one();
				/* a busy guest seldom sleeps: log its stack and counters again as it goes */
				if (n % 256 == 0) relog_scratch();
			}
			churn_credit += elapsed * churn;
			while (churn_credit >= TICK_HZ) {
				churn_credit -= TICK_HZ;
				churn_one();
			}
		}
		/* sleep until the next tick or byte; sti's shadow makes sti+hlt atomic */
		__asm__ volatile("cli");
		/* the loop's writes to stack and counters are logged once more, after they landed */
		relog_scratch();
		if (rx_tail == rx_head && ticks == seen) __asm__ volatile("sti; hlt" ::: "memory");
		else __asm__ volatile("sti");
	}
	__asm__ volatile("cli");
	report_counter("halt");
	do_verify();
	puts_("SGMGUEST halted\n");
}
