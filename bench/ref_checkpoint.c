// SPDX-License-Identifier: GPL-2.0-or-later
/* ref_checkpoint.c: a C TCP checkpointer, the anchor passt_repair.tcp is measured against.
 *
 * Benchmark reference only, never installed. Per connection it makes the system calls CRIU's
 * libsoccr makes to dump, close, restore and resume an established connection, and nothing else
 * (no socket options of the application, no integrity check, no FIN handling: it refuses any
 * state but ESTABLISHED). Written for this project from libsoccr's documented steps.
 *
 * It is given the connections as inherited descriptors, listed on stdin after the number of bytes
 * of memory to warm (one number per line), and moves them in rounds of ROUND: every socket of the round is paused (TCP_REPAIR on), then
 * each is saved into one buffer faulted in beforehand (a fixed record, then its receive and send
 * queue bytes), then closed; then a new socket is made for every record, paused, filled, and
 * all are resumed (TCP_REPAIR off). After the timed part every new socket is checked (state,
 * queue lengths) and closed with a reset. One line of JSON on stdout gives the seconds of each
 * phase, the peak RSS and the bytes of one round's buffer.
 *
 * Per connection, dump (16): setsockopt(TCP_REPAIR, 1); getsockopt(TCP_INFO);
 *   ioctl(SIOCOUTQ, SIOCOUTQNSD, SIOCINQ); getsockopt(TCP_MAXSEG, TCP_TIMESTAMP,
 *   TCP_REPAIR_WINDOW); per queue setsockopt(TCP_REPAIR_QUEUE), getsockopt(TCP_QUEUE_SEQ),
 *   recv(MSG_PEEK); getsockname; getpeername.
 * close (1): close.
 * restore and resume (16, 19 with unsent bytes): socket; setsockopt(SO_REUSEADDR, TCP_REPAIR 1);
 *   bind; per queue setsockopt(TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ); connect;
 *   setsockopt(TCP_REPAIR_OPTIONS, TCP_TIMESTAMP); per queue setsockopt(TCP_REPAIR_QUEUE), send;
 *   unsent bytes: TCP_REPAIR 0, send, TCP_REPAIR 1; setsockopt(TCP_REPAIR_WINDOW);
 *   setsockopt(TCP_REPAIR, 0).
 *
 * Usage: ref_checkpoint ROUND BYTES_PER_CONNECTION < warm-bytes-and-descriptors
 * Exit status: 0 when every connection moved and checked out, 1 on any failure, 2 on usage error.
 * Build: cc -O2 -o ref_checkpoint ref_checkpoint.c
 */

#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#ifndef TCP_REPAIR_WINDOW
#define TCP_REPAIR_WINDOW 29
#endif
#ifndef SIOCOUTQNSD
#define SIOCOUTQNSD 0x894B
#endif

#define REPAIR_RECV_QUEUE 1
#define REPAIR_SEND_QUEUE 2
#define OPT_MAXSEG 2
#define OPT_WINDOW 3
#define OPT_SACK_PERM 4
#define OPT_TIMESTAMP 8
#define INFO_TIMESTAMPS 1
#define INFO_SACK 2
#define INFO_WSCALE 4

/* What travels per connection, as libsoccr_sk_data plus the two addresses; the queues follow it. */
struct record {
	uint32_t inq_len, inq_seq, outq_len, outq_seq, unsq_len;
	uint32_t opt_mask, mss_clamp, snd_wscale, rcv_wscale, timestamp;
	uint32_t window[5]; /* snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup */
	socklen_t local_len, remote_len;
	struct sockaddr_storage local, remote;
};

/* The first bytes of struct tcp_info: all a checkpoint needs from it. */
struct info_head {
	uint8_t state, ca_state, retransmits, probes, backoff, options, wscales;
};

/* peak_rss_kib() - VmHWM of this process (ru_maxrss would carry the parent's over the exec) */
static long peak_rss_kib(void)
{
	char line[256];
	long kib = -1;
	FILE *f = fopen("/proc/self/status", "r");

	while (f && fgets(line, sizeof(line), f))
		if (sscanf(line, "VmHWM: %ld", &kib) == 1)
			break;
	if (f)
		fclose(f);
	return kib;
}

/* fail() - print what failed with errno and exit 1 */
static void fail(const char *what, int fd)
{
	fprintf(stderr, "ref_checkpoint: %s on descriptor %d: %s\n", what, fd, strerror(errno));
	exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void set_int(int fd, int level, int option, int value, const char *what)
{
	if (setsockopt(fd, level, option, &value, sizeof(value)))
		fail(what, fd);
}

static uint32_t get_u32(int fd, int level, int option, const char *what)
{
	uint32_t value;
	socklen_t len = sizeof(value);

	if (getsockopt(fd, level, option, &value, &len))
		fail(what, fd);
	return value;
}

static uint32_t ioctl_int(int fd, unsigned long request, const char *what)
{
	int value;

	if (ioctl(fd, request, &value))
		fail(what, fd);
	return value;
}

/* peek_queue() - select a queue, read its sequence number, peek its @len bytes into @into
 * #syscalls: setsockopt(TCP_REPAIR_QUEUE) getsockopt(TCP_QUEUE_SEQ) recv(MSG_PEEK)
 */
static uint32_t peek_queue(int fd, int queue, char *into, uint32_t len)
{
	uint32_t seq;

	set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, queue, "setsockopt(TCP_REPAIR_QUEUE)");
	seq = get_u32(fd, SOL_TCP, TCP_QUEUE_SEQ, "getsockopt(TCP_QUEUE_SEQ)");
	/* One byte more than counted: a longer queue shows as a mismatch instead of being cut. */
	if (len && recv(fd, into, len + 1, MSG_PEEK | MSG_DONTWAIT) != (ssize_t)len)
		fail("recv(MSG_PEEK) of the counted bytes", fd);
	return seq;
}

/* save() - dump the paused socket @fd into @r and the bytes after it; return the bytes used
 * #syscalls: getsockopt(TCP_INFO TCP_MAXSEG TCP_TIMESTAMP TCP_REPAIR_WINDOW) ioctl(SIOCOUTQ
 *            SIOCOUTQNSD SIOCINQ) getsockname getpeername, and peek_queue's twice
 */
static size_t save(int fd, struct record *r, size_t room)
{
	struct info_head info;
	socklen_t len = sizeof(info);
	char *queues = (char *)(r + 1);

	if (getsockopt(fd, SOL_TCP, TCP_INFO, &info, &len) || len != sizeof(info))
		fail("getsockopt(TCP_INFO)", fd);
	if (info.state != TCP_ESTABLISHED) {
		errno = EINVAL;
		fail("not ESTABLISHED", fd);
	}
	r->outq_len = ioctl_int(fd, SIOCOUTQ, "ioctl(SIOCOUTQ)");
	r->unsq_len = ioctl_int(fd, SIOCOUTQNSD, "ioctl(SIOCOUTQNSD)");
	r->inq_len = ioctl_int(fd, SIOCINQ, "ioctl(SIOCINQ)");
	if (sizeof(*r) + r->inq_len + r->outq_len + 1 > room) {
		errno = ENOBUFS;
		fail("queues larger than the buffer", fd);
	}
	r->mss_clamp = get_u32(fd, SOL_TCP, TCP_MAXSEG, "getsockopt(TCP_MAXSEG)");
	r->opt_mask = info.options;
	r->snd_wscale = info.options & INFO_WSCALE ? info.wscales & 0xf : 0;
	r->rcv_wscale = info.options & INFO_WSCALE ? info.wscales >> 4 : 0;
	r->timestamp = 0;
	if (info.options & INFO_TIMESTAMPS)
		r->timestamp = get_u32(fd, SOL_TCP, TCP_TIMESTAMP, "getsockopt(TCP_TIMESTAMP)");
	len = sizeof(r->window);
	if (getsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, r->window, &len) || len != sizeof(r->window))
		fail("getsockopt(TCP_REPAIR_WINDOW)", fd);
	r->inq_seq = peek_queue(fd, REPAIR_RECV_QUEUE, queues, r->inq_len);
	r->outq_seq = peek_queue(fd, REPAIR_SEND_QUEUE, queues + r->inq_len, r->outq_len);
	r->local_len = sizeof(r->local);
	if (getsockname(fd, (struct sockaddr *)&r->local, &r->local_len))
		fail("getsockname()", fd);
	r->remote_len = sizeof(r->remote);
	if (getpeername(fd, (struct sockaddr *)&r->remote, &r->remote_len))
		fail("getpeername()", fd);
	return sizeof(*r) + r->inq_len + r->outq_len;
}

/* write_queue() - write @len bytes into the selected queue, in smaller pieces if refused
 * #syscalls: send
 */
static void write_queue(int fd, const char *data, uint32_t len)
{
	uint32_t chunk = len;

	while (len) {
		ssize_t n = send(fd, data, chunk < len ? chunk : len, 0);

		if (n <= 0) {
			if (chunk <= 1024)
				fail("send() into a queue", fd);
			chunk /= 2; /* as libsoccr: a repair-mode write is one linear buffer */
			continue;
		}
		data += n;
		len -= n;
	}
}

/* fill() - make paused socket @fd continue the connection in @r, then return the bytes it used
 * #syscalls: bind setsockopt(TCP_REPAIR_QUEUE TCP_QUEUE_SEQ TCP_REPAIR_OPTIONS TCP_TIMESTAMP
 *            TCP_REPAIR TCP_REPAIR_WINDOW) connect send
 */
static size_t fill(int fd, const struct record *r)
{
	const char *queues = (const char *)(r + 1);
	struct { uint32_t code, value; } opts[4];
	int n = 0;

	if (bind(fd, (const struct sockaddr *)&r->local, r->local_len))
		fail("bind()", fd);
	set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, REPAIR_RECV_QUEUE, "setsockopt(TCP_REPAIR_QUEUE)");
	set_int(fd, SOL_TCP, TCP_QUEUE_SEQ, r->inq_seq - r->inq_len, "setsockopt(TCP_QUEUE_SEQ)");
	set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, REPAIR_SEND_QUEUE, "setsockopt(TCP_REPAIR_QUEUE)");
	set_int(fd, SOL_TCP, TCP_QUEUE_SEQ, r->outq_seq - r->outq_len, "setsockopt(TCP_QUEUE_SEQ)");
	if (connect(fd, (const struct sockaddr *)&r->remote, r->remote_len))
		fail("connect() in repair mode", fd);

	opts[n].code = OPT_MAXSEG, opts[n++].value = r->mss_clamp;
	if (r->opt_mask & INFO_WSCALE)
		opts[n].code = OPT_WINDOW, opts[n++].value = r->snd_wscale | r->rcv_wscale << 16;
	if (r->opt_mask & INFO_SACK)
		opts[n].code = OPT_SACK_PERM, opts[n++].value = 0;
	if (r->opt_mask & INFO_TIMESTAMPS)
		opts[n].code = OPT_TIMESTAMP, opts[n++].value = 0;
	if (setsockopt(fd, SOL_TCP, TCP_REPAIR_OPTIONS, opts, n * sizeof(opts[0])))
		fail("setsockopt(TCP_REPAIR_OPTIONS)", fd);
	if (r->opt_mask & INFO_TIMESTAMPS &&
	    setsockopt(fd, SOL_TCP, TCP_TIMESTAMP, &r->timestamp, sizeof(r->timestamp)))
		fail("setsockopt(TCP_TIMESTAMP)", fd);

	if (r->inq_len) {
		set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, REPAIR_RECV_QUEUE, "setsockopt(TCP_REPAIR_QUEUE)");
		write_queue(fd, queues, r->inq_len);
	}
	if (r->outq_len > r->unsq_len) {
		set_int(fd, SOL_TCP, TCP_REPAIR_QUEUE, REPAIR_SEND_QUEUE, "setsockopt(TCP_REPAIR_QUEUE)");
		write_queue(fd, queues + r->inq_len, r->outq_len - r->unsq_len);
	}
	if (r->unsq_len) { /* never sent: written as an application would, out of repair mode */
		set_int(fd, SOL_TCP, TCP_REPAIR, 0, "setsockopt(TCP_REPAIR, 0)");
		write_queue(fd, queues + r->inq_len + r->outq_len - r->unsq_len, r->unsq_len);
		set_int(fd, SOL_TCP, TCP_REPAIR, 1, "setsockopt(TCP_REPAIR, 1)");
	}
	if (setsockopt(fd, SOL_TCP, TCP_REPAIR_WINDOW, r->window, sizeof(r->window)))
		fail("setsockopt(TCP_REPAIR_WINDOW)", fd);
	return sizeof(*r) + r->inq_len + r->outq_len;
}

/* check() - after the timed part: the new socket is ESTABLISHED and holds the queues of @r
 * #syscalls: getsockopt(TCP_INFO) ioctl(SIOCINQ SIOCOUTQ)
 */
static int check(int fd, const struct record *r)
{
	struct info_head info;
	socklen_t len = sizeof(info);

	if (getsockopt(fd, SOL_TCP, TCP_INFO, &info, &len) || info.state != TCP_ESTABLISHED)
		return 0;
	return ioctl_int(fd, SIOCINQ, "ioctl(SIOCINQ)") == r->inq_len &&
	       ioctl_int(fd, SIOCOUTQ, "ioctl(SIOCOUTQ)") == r->outq_len;
}

int main(int argc, char **argv)
{
	double dump = 0, close_s = 0, restore = 0, warmed, start, t0, t1, t2, t3;
	long round, per_connection, n = 0, first, i, checked = 0;
	int *fds = NULL, *made, fd;
	size_t room, size = 0, off, warm;
	char *buffer;

	if (argc != 3 || (round = atol(argv[1])) < 1 || (per_connection = atol(argv[2])) < 1) {
		fprintf(stderr, "usage: ref_checkpoint ROUND BYTES_PER_CONNECTION < warm-bytes-and-descriptors\n");
		return 2;
	}
	if (scanf("%zu", &warm) != 1) {
		fprintf(stderr, "ref_checkpoint: no warm byte count on stdin\n");
		return 2;
	}
	for (long cap = 0; scanf("%d", &fd) == 1; fds[n++] = fd) {
		if (n == cap && !(fds = realloc(fds, (cap = cap * 2 + 1024) * sizeof(*fds))))
			fail("realloc()", -1);
	}
	room = (size_t)(round < n ? round : n) * (sizeof(struct record) + per_connection);
	/* The buffer a migrating program keeps ready: every page faulted in before the timing. */
	buffer = mmap(NULL, room, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	made = calloc(n ? n : 1, sizeof(*made));
	if (buffer == MAP_FAILED || !made)
		fail("mmap() of the buffer", -1);
	/* Memory freed back to the host costs a host fault at first touch: warm it, as the bench says. */
	warmed = now();
	if (warm) {
		void *touched = mmap(NULL, warm, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

		if (touched == MAP_FAILED)
			fail("mmap() of the memory to warm", -1);
		munmap(touched, warm);
		/* The peak RSS from here on is the move's, not the warming's. */
		FILE *refs = fopen("/proc/self/clear_refs", "w");

		if (!refs || fputs("5", refs) < 0 || fclose(refs))
			fail("resetting the peak RSS (clear_refs)", -1);
	}
	warmed = now() - warmed;

	start = now();
	for (first = 0; first < n; first += round) {
		long last = first + round < n ? first + round : n;

		t0 = now();
		for (i = first; i < last; i++)
			set_int(fds[i], SOL_TCP, TCP_REPAIR, 1, "setsockopt(TCP_REPAIR, 1)");
		for (off = 0, i = first; i < last; i++)
			off += save(fds[i], (struct record *)(buffer + off), room - off);
		size += off;
		t1 = now();
		for (i = first; i < last; i++)
			close(fds[i]);
		t2 = now();
		for (off = 0, i = first; i < last; i++) {
			struct record *r = (struct record *)(buffer + off);

			made[i] = socket(r->local.ss_family, SOCK_STREAM, 0);
			if (made[i] < 0)
				fail("socket()", -1);
			set_int(made[i], SOL_SOCKET, SO_REUSEADDR, 1, "setsockopt(SO_REUSEADDR)");
			off += sizeof(*r) + r->inq_len + r->outq_len;
		}
		for (i = first; i < last; i++)
			set_int(made[i], SOL_TCP, TCP_REPAIR, 1, "setsockopt(TCP_REPAIR, 1)");
		for (off = 0, i = first; i < last; i++)
			off += fill(made[i], (struct record *)(buffer + off));
		for (i = first; i < last; i++)
			set_int(made[i], SOL_TCP, TCP_REPAIR, 0, "setsockopt(TCP_REPAIR, 0)");
		t3 = now();
		dump += t1 - t0;
		close_s += t2 - t1;
		restore += t3 - t2;
		/* Checked before the next round overwrites the records, outside the timing. */
		for (off = 0, i = first; i < last; i++) {
			struct record *r = (struct record *)(buffer + off);

			checked += check(made[i], r);
			off += sizeof(*r) + r->inq_len + r->outq_len;
		}
		start += now() - t3;
	}
	t3 = now() - start;
	for (i = 0; i < n; i++) { /* with a reset: a graceful close would leave orphans retransmitting */
		struct linger reset = { .l_onoff = 1, .l_linger = 0 };

		setsockopt(made[i], SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
		close(made[i]);
	}
	printf("{\"connections\": %ld, \"checked\": %ld, \"total_s\": %.9f, \"dump_s\": %.9f, \"close_s\": %.9f, "
	       "\"restore_s\": %.9f, \"bytes\": %zu, \"buffer_bytes\": %zu, \"maxrss_kib\": %ld, "
	       "\"memory_warmed_s\": %.9f}\n",
	       n, checked, t3, dump, close_s, restore, size, room, peak_rss_kib(), warmed);
	return checked == n ? 0 : 1;
}
