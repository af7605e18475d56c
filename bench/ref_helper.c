// SPDX-License-Identifier: GPL-2.0-or-later
/* ref_helper.c: a plain C passt-repair, the floor the Python helper is measured against.
 *
 * Benchmark reference only, never installed. Same protocol as passt-repair: connect to the
 * server's UNIX socket PATH (or wait in directory PATH for a socket named *.repair), then for
 * every message: one recvmsg() with room for 253 descriptors (msghdr and control length set up
 * afresh each time), setsockopt(TCP_REPAIR) and close() per descriptor, one send() of the byte.
 * By default it neither reads the prior state nor rolls back on failure: the least work a separate
 * helper process can do per message. With --exact it gives the Python helper's guarantee, the
 * way C would: getsockopt(TCP_REPAIR) on every descriptor first, and on a failed setsockopt()
 * the ones already changed are put back (off without window probe, or on).
 *
 * Usage: ref_helper [--exact] PATH
 * Exit status: 0 on end of file or connection reset, 1 on error, 2 on usage error.
 * Build: cc -O2 -o ref_helper ref_helper.c
 */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <netinet/in.h>
#include <netinet/tcp.h>

#define SCM_MAX_FD 253
#define RETRY_FIRST_NS 50000L     /* ECONNREFUSED: first retry after 50 us ... */
#define RETRY_MAX_NS 10000000L    /* ... doubling up to 10 ms, as the Python helper does */

static int exact;

static void fail(const char *what)
{
	fprintf(stderr, "ref_helper: %s: %s\n", what, strerror(errno));
}

/* connect_path() - connect to the UNIX socket at @path
 * #syscalls: socket connect close
 * Return: the connected socket, or -1 with errno set
 */
static int connect_path(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	int s, saved;

	if (strlen(path) >= sizeof(a.sun_path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(a.sun_path, path);
	s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -1;
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) == 0)
		return s;
	saved = errno;
	close(s);
	errno = saved;
	return -1;
}

static int is_repair_name(const char *name)
{
	size_t n = strlen(name);

	return n > 7 && !strcmp(name + n - 7, ".repair");
}

/* connect_in_directory() - wait for a *.repair socket to be created in @dir, connect to it
 * #syscalls: inotify_init1 inotify_add_watch read socket connect close nanosleep
 * While the server has bound but not listened yet, connect() fails with ECONNREFUSED:
 * retry with a doubling back-off instead of spinning.
 * Return: the connected socket, or -1 on error
 */
static int connect_in_directory(const char *dir)
{
	char buf[sizeof(struct inotify_event) + NAME_MAX + 1]
		__attribute__((aligned(__alignof__(struct inotify_event))));
	char path[PATH_MAX];
	int fd = inotify_init1(IN_CLOEXEC);

	if (fd < 0 || inotify_add_watch(fd, dir, IN_CREATE) < 0) {
		fail("inotify");
		return -1;
	}
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		const struct inotify_event *ev;

		if (n < 0) {
			fail("read inotify");
			return -1;
		}
		for (char *p = buf; p < buf + n; p += sizeof(*ev) + ev->len) {
			struct timespec wait = { 0, RETRY_FIRST_NS };
			int s;

			ev = (const struct inotify_event *)p;
			if (!ev->len || !is_repair_name(ev->name))
				continue;
			snprintf(path, sizeof(path), "%s/%s", dir, ev->name);
			while ((s = connect_path(path)) < 0 && errno == ECONNREFUSED) {
				nanosleep(&wait, NULL);
				wait.tv_nsec = wait.tv_nsec * 2 > RETRY_MAX_NS ? RETRY_MAX_NS : wait.tv_nsec * 2;
			}
			if (s >= 0) {
				close(fd);
				return s;
			}
		}
	}
}

/* switch_all() - set TCP_REPAIR to @val on @n sockets; with --exact, all of them or none
 * #syscalls: getsockopt setsockopt
 * Return: 0 on success, else the errno of the call that failed
 */
static int switch_all(const int *fds, int n, int val)
{
	int prior[SCM_MAX_FD];
	socklen_t len = sizeof(int);

	for (int i = 0; exact && i < n; i++) {
		if (getsockopt(fds[i], SOL_TCP, TCP_REPAIR, &prior[i], &len))
			return errno;
	}
	for (int i = 0; i < n; i++) {
		if (!setsockopt(fds[i], SOL_TCP, TCP_REPAIR, &val, sizeof(val)))
			continue;
		int err = errno;

		for (int j = 0; exact && j < i; j++) {
			int undo = prior[j] ? TCP_REPAIR_ON : TCP_REPAIR_OFF_NO_WP;

			if (prior[j] != (val == TCP_REPAIR_ON))
				setsockopt(fds[j], SOL_TCP, TCP_REPAIR, &undo, sizeof(undo));
		}
		return err;
	}
	return 0;
}

/* serve() - switch the sockets of every request on @s and echo its byte, until end of file
 * #syscalls: recvmsg getsockopt setsockopt close send
 * Return: 0 on end of file or reset, 1 on error
 */
static int serve(int s)
{
	for (;;) {
		char ctl[CMSG_SPACE(sizeof(int) * SCM_MAX_FD)]
			__attribute__((aligned(__alignof__(struct cmsghdr))));
		int8_t cmd;
		struct iovec iov = { &cmd, sizeof(cmd) };
		struct msghdr msg = {
			.msg_iov = &iov, .msg_iovlen = 1,
			.msg_control = ctl, .msg_controllen = sizeof(ctl),
		};
		struct cmsghdr *cmsg;
		int *fds, nfds, val, err = 0;
		ssize_t n;

		n = recvmsg(s, &msg, 0);
		if (n == 0 || (n < 0 && errno == ECONNRESET))
			return 0;
		if (n < 0) {
			fail("recvmsg");
			return 1;
		}
		cmsg = CMSG_FIRSTHDR(&msg);
		if (!cmsg || cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) {
			fprintf(stderr, "ref_helper: no SCM_RIGHTS\n");
			return 1;
		}
		fds = (int *)CMSG_DATA(cmsg);
		nfds = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		val = cmd;
		if (msg.msg_flags & MSG_CTRUNC || (val != 1 && val != 0 && val != TCP_REPAIR_OFF_NO_WP))
			err = EINVAL;
		if (!err)
			err = switch_all(fds, nfds, val);
		for (int i = 0; i < nfds; i++)
			close(fds[i]);
		if (err) {
			errno = err;
			fail("setsockopt TCP_REPAIR");
			return 1;
		}
		if (send(s, &cmd, sizeof(cmd), MSG_NOSIGNAL) != 1) {
			fail("send");
			return 1;
		}
	}
}

int main(int argc, char **argv)
{
	struct stat st;
	int s;

	if (argc == 3 && !strcmp(argv[1], "--exact")) {
		exact = 1;
		argv++;
		argc--;
	}
	if (argc != 2) {
		fprintf(stderr, "usage: ref_helper [--exact] PATH\n");
		return 2;
	}
	if (stat(argv[1], &st)) {
		fail("stat");
		return 1;
	}
	s = S_ISDIR(st.st_mode) ? connect_in_directory(argv[1]) : connect_path(argv[1]);
	if (s < 0) {
		fail("connect");
		return 1;
	}
	return serve(s);
}
