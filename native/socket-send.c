/* A thread per connection that hands the connection's queued bytes to the
 * kernel, so that the event loop's thread does not.
 *
 * Writing to a socket was the largest single cost on the scatter's event
 * loop: a quarter of its samples (docs/cost-history.md). The event loop's
 * thread is what bounds how fast one process moves pages, so the writes
 * move to a thread of their own. The event loop pushes (address, length)
 * pairs of buffers it keeps alive until `written` passes their end; this
 * thread writes them in order with one sendmsg(2) for many buffers.
 *
 * The thread writes to its own duplicate of the socket's descriptor: were
 * the runtime to close its descriptor first, the number could be handed to
 * another socket, and these bytes must never reach another peer.
 *
 * The event loop learns of progress by reading `written`, and is called
 * back (through a thread-safe JSCallback, which the runtime runs on the
 * event loop's thread) once the bytes it asked to wait for are written, or
 * on an error.
 *
 * One thread pushes (the event loop's) and one writes, so the ring takes no
 * lock: a lock held by a writing thread that the scheduler has preempted
 * would stall the event loop on a busy host. The writer sleeps on a futex
 * when the ring is empty, and a push wakes it only then. */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define SLOTS 1024 /* a power of two */
#define BATCH 64   /* buffers a sendmsg */

typedef void (*wake_fn)(int32_t id);

struct sgm_sender {
	/* read by the event loop through a view of these 16 bytes: bytes
	 * written so far (a double: exact to 2^53), and 0 or the errno that
	 * stopped the thread */
	double written;
	int32_t error;
	/* bumped to wake the writer from its futex wait */
	uint32_t wakes;
	int fd;
	int stop_fd;
	int32_t id;
	wake_fn wake;
	pthread_t thread;
	struct iovec slots[SLOTS];
	uint64_t head;     /* the writer's: slots before it are written */
	uint64_t tail;     /* the event loop's: slots before it are pushed */
	uint64_t wake_at;  /* call wake once written reaches it; 0: not asked */
	int32_t sleeping;  /* the writer waits on `wakes` */
	int32_t stopping;
};

static void futex_wait(uint32_t *word, uint32_t seen) {
	syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

static void futex_wake(uint32_t *word) {
	syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void store_written(struct sgm_sender *s, uint64_t written) {
	double value = (double)written;
	uint64_t bits;
	memcpy(&bits, &value, sizeof bits);
	/* sequentially consistent with the load of wake_at after it, as
	 * sgm_sender_wake_at stores wake_at before it loads this: one of the
	 * two sides sees the other's store, so no wake is lost */
	__atomic_store_n((uint64_t *)&s->written, bits, __ATOMIC_SEQ_CST);
}

static uint64_t load_written(struct sgm_sender *s) {
	uint64_t bits = __atomic_load_n((uint64_t *)&s->written, __ATOMIC_SEQ_CST);
	double value;
	memcpy(&value, &bits, sizeof value);
	return (uint64_t)value;
}

/* Waits until a slot is pushed or the sender stops; returns the tail seen. */
static uint64_t wait_for_push(struct sgm_sender *s, uint64_t head) {
	for (;;) {
		uint64_t tail = __atomic_load_n(&s->tail, __ATOMIC_ACQUIRE);
		if (tail != head || __atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE)) return tail;
		uint32_t seen = __atomic_load_n(&s->wakes, __ATOMIC_ACQUIRE);
		__atomic_store_n(&s->sleeping, 1, __ATOMIC_SEQ_CST);
		/* a push after this check sees `sleeping` and bumps `wakes` */
		tail = __atomic_load_n(&s->tail, __ATOMIC_SEQ_CST);
		if (tail == head && !__atomic_load_n(&s->stopping, __ATOMIC_SEQ_CST)) futex_wait(&s->wakes, seen);
		__atomic_store_n(&s->sleeping, 0, __ATOMIC_RELAXED);
	}
}

static void *run(void *arg) {
	struct sgm_sender *s = arg;
	struct iovec iov[BATCH];
	uint64_t written = 0;
	uint64_t head = 0;
	for (;;) {
		uint64_t tail = wait_for_push(s, head);
		if (__atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE)) break;
		int n = 0;
		for (uint64_t i = head; i < tail && n < BATCH; i++) iov[n++] = s->slots[i & (SLOTS - 1)];
		struct msghdr msg;
		memset(&msg, 0, sizeof msg);
		msg.msg_iov = iov;
		msg.msg_iovlen = n;
		ssize_t r = sendmsg(s->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (r < 0) {
			int err = errno;
			if (err == EINTR) continue;
			if (err == EAGAIN) {
				struct pollfd fds[2] = { { .fd = s->fd, .events = POLLOUT }, { .fd = s->stop_fd, .events = POLLIN } };
				poll(fds, 2, -1);
				continue;
			}
			__atomic_store_n(&s->error, err, __ATOMIC_RELEASE);
			s->wake(s->id);
			break; /* nothing more is written */
		}
		size_t left = (size_t)r;
		while (left > 0) {
			struct iovec *slot = &s->slots[head & (SLOTS - 1)];
			if (left >= slot->iov_len) {
				left -= slot->iov_len;
				head++;
			} else {
				/* the rest of this slot is written next: the slot is the writer's until head passes it */
				slot->iov_base = (char *)slot->iov_base + left;
				slot->iov_len -= left;
				left = 0;
			}
		}
		written += (uint64_t)r;
		/* head first: an event loop that sees these bytes written must also
		 * see their slots free, or it would find the ring full meanwhile */
		__atomic_store_n(&s->head, head, __ATOMIC_RELEASE);
		store_written(s, written);
		uint64_t at = __atomic_load_n(&s->wake_at, __ATOMIC_SEQ_CST);
		if (at != 0 && written >= at && __atomic_compare_exchange_n(&s->wake_at, &at, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) s->wake(s->id);
	}
	return NULL;
}

/* Starts a sender for socket `fd`; null if it cannot. */
struct sgm_sender *sgm_sender_open(int fd, int32_t id, wake_fn wake) {
	struct sgm_sender *s = calloc(1, sizeof *s);
	if (!s) return NULL;
	s->id = id;
	s->wake = wake;
	s->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	s->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (s->fd >= 0 && s->stop_fd >= 0 && pthread_create(&s->thread, NULL, run, s) == 0) return s;
	if (s->fd >= 0) close(s->fd);
	if (s->stop_fd >= 0) close(s->stop_fd);
	free(s);
	return NULL;
}

/* Queues `length` bytes at `data`, which the caller keeps unchanged until
 * written passes them. Returns 0 if every slot is taken: push it later. */
int sgm_sender_push(struct sgm_sender *s, const void *data, uint64_t length) {
	uint64_t tail = s->tail;
	if (tail - __atomic_load_n(&s->head, __ATOMIC_ACQUIRE) >= SLOTS) return 0;
	s->slots[tail & (SLOTS - 1)] = (struct iovec){ .iov_base = (void *)data, .iov_len = length };
	__atomic_store_n(&s->tail, tail + 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&s->sleeping, __ATOMIC_SEQ_CST)) {
		__atomic_add_fetch(&s->wakes, 1, __ATOMIC_SEQ_CST);
		futex_wake(&s->wakes);
	}
	return 1;
}

/* Asks to be woken once `bytes` are written. Returns 1 if they already
 * are (no wake will come), 0 if the wake will come (or an error's). */
int sgm_sender_wake_at(struct sgm_sender *s, double bytes) {
	uint64_t at = (uint64_t)bytes;
	__atomic_store_n(&s->wake_at, at, __ATOMIC_SEQ_CST);
	if (load_written(s) < at && __atomic_load_n(&s->error, __ATOMIC_SEQ_CST) == 0) return 0;
	/* reached already: take the request back, unless the writer took it and wakes us */
	return __atomic_compare_exchange_n(&s->wake_at, &at, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Stops the thread, whatever is left unwritten, and frees the sender.
 * Returns the bytes it wrote, its last ones included. */
double sgm_sender_close(struct sgm_sender *s) {
	__atomic_store_n(&s->stopping, 1, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&s->wakes, 1, __ATOMIC_SEQ_CST);
	futex_wake(&s->wakes);
	uint64_t one = 1;
	if (write(s->stop_fd, &one, sizeof one) < 0) { /* the thread also sees `stopping` */ }
	pthread_join(s->thread, NULL);
	double written = (double)load_written(s);
	close(s->fd);
	close(s->stop_fd);
	free(s);
	return written;
}
