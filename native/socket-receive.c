/* One non-blocking receive from a socket into the caller's buffer.
 *
 * Bun's sockets hand every read to JavaScript in a fresh buffer, and that
 * costs a receiving role about a third of what it spends taking bytes in
 * (README, Cost per GiB). A connection whose Bun socket has just reported
 * data reads what else is waiting with this, into one buffer used again,
 * on the event loop's own thread (core/net/socket-receive.ts).
 *
 * Returns the bytes read, 0 at the peer's end of stream, or -errno: errno
 * is read here, next to the call that set it, because the runtime may make
 * system calls of its own before JavaScript could ask for it. */

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
