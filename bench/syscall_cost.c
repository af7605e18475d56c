/* syscall_cost.c: what the kernel charges per descriptor for the calls a helper makes, from C.
 *
 * Benchmark tool only. Opens 253 loopback TCP connections and times, per socket and averaged
 * over many rounds: a system call that does nothing (getppid, the entry/exit floor),
 * getsockopt(TCP_REPAIR), setsockopt(TCP_REPAIR) switching ON and OFF_NO_WP (no window probe)
 * and ON and OFF (with the probe), close() of a dup, and close_range() of 253 dups. Then the
 * C helper's whole step for a one-descriptor request (recvmsg, setsockopt, close, send over a
 * socketpair), with the caches warm and after 16 MiB were touched (cold, as after a sleep).
 * Must run with CAP_NET_ADMIN. Prints one JSON object of nanoseconds.
 *
 * Usage: syscall_cost [ROUNDS]
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define N 253
#define COLD_BYTES (16 << 20)

static volatile char junk[COLD_BYTES];

static double now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* message() - median time of the C helper's step for a one-descriptor request, @cold or not */
static double message(int fd, int rounds, int cold)
{
	double *t = calloc(rounds, sizeof(double)), median;
	int sv[2];

	if (!t || socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		exit(1);
	for (int r = 0; r < rounds; r++) {
		char ctl[CMSG_SPACE(sizeof(int) * N)], cmd = r % 2 ? TCP_REPAIR_OFF_NO_WP : TCP_REPAIR_ON, got;
		struct iovec iov = { &cmd, 1 };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
				    .msg_controllen = CMSG_SPACE(sizeof(int)) };
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		double start;
		int in, v;

		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
		if (sendmsg(sv[0], &m, 0) != 1)
			exit(1);
		for (int k = 0; cold && k < COLD_BYTES; k += 64)
			junk[k] = (char)k;
		start = now_ns();
		iov.iov_base = &got;
		m.msg_controllen = sizeof(ctl);
		if (recvmsg(sv[1], &m, 0) != 1)
			exit(1);
		memcpy(&in, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof(int));
		v = got;
		setsockopt(in, SOL_TCP, TCP_REPAIR, &v, sizeof(v));
		close(in);
		send(sv[1], &got, 1, 0);
		t[r] = now_ns() - start;
		recv(sv[0], &got, 1, 0);
	}
	qsort(t, rounds, sizeof(double), cmp_double);
	median = t[rounds / 2];
	free(t);
	close(sv[0]);
	close(sv[1]);
	return median;
}

int main(int argc, char **argv)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int rounds = argc > 1 ? atoi(argv[1]) : 200, l, s[N], d[N], v;
	double t, floor = 0, get = 0, set_nowp = 0, set_probe = 0, cl = 0, cr = 0;
	socklen_t al = sizeof(a), vl;

	l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0 || bind(l, (struct sockaddr *)&a, al) || listen(l, N) || getsockname(l, (struct sockaddr *)&a, &al))
		return 1;
	for (int i = 0; i < N; i++) {
		s[i] = socket(AF_INET, SOCK_STREAM, 0);
		if (s[i] < 0 || connect(s[i], (struct sockaddr *)&a, al) || accept(l, NULL, NULL) < 0)
			return 1;
	}
	for (int r = 0; r < rounds; r++) {
		t = now_ns();
		for (int i = 0; i < N; i++)
			syscall(SYS_getppid);
		floor += now_ns() - t;
		t = now_ns();
		for (int i = 0; i < N; i++) {
			vl = sizeof(v);
			getsockopt(s[i], SOL_TCP, TCP_REPAIR, &v, &vl);
		}
		get += now_ns() - t;
		for (int pass = 0; pass < 2; pass++) {
			t = now_ns();
			for (int i = 0; i < N; i++) {
				v = pass ? TCP_REPAIR_OFF_NO_WP : TCP_REPAIR_ON;
				if (setsockopt(s[i], SOL_TCP, TCP_REPAIR, &v, sizeof(v)))
					return 1;
			}
			set_nowp += now_ns() - t;
		}
		for (int pass = 0; pass < 2; pass++) {
			t = now_ns();
			for (int i = 0; i < N; i++) {
				v = pass ? TCP_REPAIR_OFF : TCP_REPAIR_ON;
				setsockopt(s[i], SOL_TCP, TCP_REPAIR, &v, sizeof(v));
			}
			set_probe += now_ns() - t;
		}
		for (int i = 0; i < N; i++)
			d[i] = dup(s[i]);
		t = now_ns();
		for (int i = 0; i < N; i++)
			close(d[i]);
		cl += now_ns() - t;
		for (int i = 0; i < N; i++)
			d[i] = dup(s[i]);
		t = now_ns();
		syscall(SYS_close_range, d[0], d[N - 1], 0);
		cr += now_ns() - t;
	}
	t = (double)rounds * N;
	printf("{\"syscall_floor\": %.0f, \"getsockopt\": %.0f, \"setsockopt_on_off_no_wp\": %.0f, "
	       "\"setsockopt_on_off_probe\": %.0f, \"close\": %.0f, \"close_range_per_fd\": %.0f, "
	       "\"message_hot\": %.0f, \"message_cold\": %.0f}\n",
	       floor / t, get / t, set_nowp / t / 2, set_probe / t / 2, cl / t, cr / t,
	       message(s[0], rounds * 3, 0), message(s[0], rounds * 3, 1));
	return 0;
}
