/* One non-blocking receive from a socket into the caller's buffer.
 *
 * Bun's sockets hand every read to JavaScript in a fresh buffer, and that
 * costs a receiving role about a third of what it spends taking bytes in
 * (docs/cost-history.md). A connection whose Bun socket has just reported
 * data reads what else is waiting with this, into one buffer used again,
 * on the event loop's own thread (core/net/socket-receive.ts).
 *
 * Returns the bytes read, 0 at the peer's end of stream, or -errno: errno
 * is read here, next to the call that set it, because the runtime may make
 * system calls of its own before JavaScript could ask for it. */

#define _GNU_SOURCE
#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

long sgm_receive(int fd, void *buffer, unsigned long length) {
	for (;;) {
		ssize_t n = recv(fd, buffer, length, MSG_DONTWAIT);
		if (n >= 0) return (long)n;
		if (errno != EINTR) return -(long)errno;
	}
}

/* A thread per bulk connection that reads its socket into a ring of the
 * caller's buffers, so that the event loop's thread spends nothing on the
 * kernel's copy, and Bun's socket, paused for good, reads nothing into
 * fresh buffers (core/net/receive-thread.ts).
 *
 * One thread fills buffers in ring order and publishes each with its
 * length by bumping `filled`; the event loop feeds them in that order and
 * hands each back by bumping `consumed`. One writer per counter, so the
 * ring takes no lock. The thread sleeps on a futex while every buffer is
 * full, and in poll(2) while the socket is empty; the event loop is called
 * back (a thread-safe JSCallback, run on its own thread) only when it asked
 * to be, having found nothing left to feed.
 *
 * The thread reads its own duplicate of the descriptor, and the caller then
 * closes the runtime's socket: a runtime that keeps a socket, even paused,
 * reads it when the peer hangs up (Bun 1.4.5 did, beside this thread, and
 * bytes reached the event loop out of order), and may take the socket's
 * error for itself. With the descriptor closed there, nothing but this
 * thread reads the socket; writes go through the sender thread's own
 * duplicate (socket-send.c), and the end of sending through this one. */

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#define RING_MAX 16

typedef void (*receiver_wake_fn)(int32_t id);

struct sgm_receiver {
	/* read by the event loop through an Int32Array over these first
	 * bytes: buffers filled so far (wraps at 2^32), then how the stream
	 * ended (0: not yet; 1: the peer's end; -errno: an error), then each
	 * buffer's length */
	uint32_t filled;
	int32_t end;
	int32_t lengths[RING_MAX];
	uint32_t consumed; /* the event loop's, through sgm_receiver_release */
	uint32_t wakes;    /* bumped to wake the thread from its futex wait */
	int32_t sleeping;  /* the thread waits on `wakes` for a free buffer */
	int32_t wanted;    /* the event loop asked for a wake at the next fill or end */
	int32_t stopping;
	int fd;
	int stop_fd;
	int32_t id;
	uint32_t ring;
	uint64_t buffer_bytes;
	char *buffers;
	receiver_wake_fn wake;
	pthread_t thread;
};

static void receiver_futex_wait(uint32_t *word, uint32_t seen) {
	syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

static void receiver_futex_wake(uint32_t *word) {
	syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Calls the event loop back if it asked, once per ask. */
static void wake_event_loop(struct sgm_receiver *r) {
	int32_t asked = 1;
	if (__atomic_compare_exchange_n(&r->wanted, &asked, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) r->wake(r->id);
}

/* Waits until buffer number `filled` is free (the event loop handed it back); 0 if stopping. */
static int wait_for_room(struct sgm_receiver *r, uint32_t filled) {
	for (;;) {
		if (__atomic_load_n(&r->stopping, __ATOMIC_ACQUIRE)) return 0;
		if (filled - __atomic_load_n(&r->consumed, __ATOMIC_ACQUIRE) < r->ring) return 1;
		uint32_t seen = __atomic_load_n(&r->wakes, __ATOMIC_ACQUIRE);
		__atomic_store_n(&r->sleeping, 1, __ATOMIC_SEQ_CST);
		/* a release after this check sees `sleeping` and bumps `wakes` */
		if (filled - __atomic_load_n(&r->consumed, __ATOMIC_SEQ_CST) >= r->ring && !__atomic_load_n(&r->stopping, __ATOMIC_SEQ_CST)) {
			receiver_futex_wait(&r->wakes, seen);
		}
		__atomic_store_n(&r->sleeping, 0, __ATOMIC_RELAXED);
	}
}

static void *receive_run(void *arg) {
	struct sgm_receiver *r = arg;
	uint32_t filled = 0;
	for (;;) {
		if (!wait_for_room(r, filled)) return NULL;
		char *buffer = r->buffers + (uint64_t)(filled % r->ring) * r->buffer_bytes;
		ssize_t n = recv(r->fd, buffer, r->buffer_bytes, MSG_DONTWAIT);
		if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
			struct pollfd fds[2] = { { .fd = r->fd, .events = POLLIN }, { .fd = r->stop_fd, .events = POLLIN } };
			poll(fds, 2, -1);
			continue;
		}
		if (n <= 0) {
			/* after every buffer filled before it: the event loop reads the end once it has fed them */
			__atomic_store_n(&r->end, n == 0 ? 1 : -errno, __ATOMIC_SEQ_CST);
			wake_event_loop(r);
			return NULL;
		}
		r->lengths[filled % r->ring] = (int32_t)n;
		__atomic_store_n(&r->filled, ++filled, __ATOMIC_SEQ_CST);
		wake_event_loop(r);
	}
}

/* Starts a thread reading socket `fd` into `ring` buffers of `buffer_bytes`
 * each, laid end to end at `buffers`, which the caller keeps until
 * sgm_receiver_close; null if it cannot. */
struct sgm_receiver *sgm_receiver_open(int fd, int32_t id, receiver_wake_fn wake, void *buffers, uint32_t ring, uint64_t buffer_bytes) {
	/* a power of two: buffer numbers wrap at 2^32 and must keep their slots */
	if (ring == 0 || ring > RING_MAX || (ring & (ring - 1)) != 0 || buffer_bytes == 0 || buffer_bytes > INT32_MAX) return NULL;
	struct sgm_receiver *r = calloc(1, sizeof *r);
	if (!r) return NULL;
	r->id = id;
	r->wake = wake;
	r->ring = ring;
	r->buffer_bytes = buffer_bytes;
	r->buffers = buffers;
	r->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	r->stop_fd = eventfd(0, EFD_CLOEXEC);
	if (r->fd >= 0 && r->stop_fd >= 0 && pthread_create(&r->thread, NULL, receive_run, r) == 0) return r;
	if (r->fd >= 0) close(r->fd);
	if (r->stop_fd >= 0) close(r->stop_fd);
	free(r);
	return NULL;
}

/* The event loop has fed every buffer before number `consumed`: the thread may fill them again. */
void sgm_receiver_release(struct sgm_receiver *r, uint32_t consumed) {
	__atomic_store_n(&r->consumed, consumed, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&r->sleeping, __ATOMIC_SEQ_CST)) {
		__atomic_add_fetch(&r->wakes, 1, __ATOMIC_SEQ_CST);
		receiver_futex_wake(&r->wakes);
	}
}

/* Asks for a wake once a buffer after number `seen` is filled or the
 * stream ends. Returns 1 if that happened already (no wake will come for
 * this ask), 0 if the wake will come. */
int sgm_receiver_wake_after(struct sgm_receiver *r, uint32_t seen) {
	__atomic_store_n(&r->wanted, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&r->filled, __ATOMIC_SEQ_CST) == seen && __atomic_load_n(&r->end, __ATOMIC_SEQ_CST) == 0) return 0;
	/* there already: take the ask back, unless the thread took it and wakes us */
	int32_t asked = 1;
	return __atomic_compare_exchange_n(&r->wanted, &asked, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* Sends what the socket takes of `length` bytes at once, from the event
 * loop's thread, as the runtime's write() did for a small write finding the
 * sender thread idle; returns the bytes sent (0 if none fit), or -errno. */
long sgm_receiver_send_now(struct sgm_receiver *r, const void *data, uint64_t length) {
	for (;;) {
		ssize_t n = send(r->fd, data, length, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n >= 0) return (long)n;
		if (errno == EAGAIN) return 0;
		if (errno != EINTR) return -(long)errno;
	}
}

/* Shuts the socket's sending side (the runtime's socket, which did it
 * before, is closed): the peer reads its end once what was written is read. */
int sgm_receiver_shutdown_write(struct sgm_receiver *r) {
	return shutdown(r->fd, SHUT_WR) == 0 ? 0 : -errno;
}

/* Stops the thread and frees the receiver; the buffers are the caller's again. */
void sgm_receiver_close(struct sgm_receiver *r) {
	__atomic_store_n(&r->stopping, 1, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&r->wakes, 1, __ATOMIC_SEQ_CST);
	receiver_futex_wake(&r->wakes);
	uint64_t one = 1;
	if (write(r->stop_fd, &one, sizeof one) < 0) { /* the thread also sees `stopping` */ }
	pthread_join(r->thread, NULL);
	close(r->fd);
	close(r->stop_fd);
	free(r);
}
