/*
 * dxl_tcp_client.c: the tcp transport's client, dxl_tcp_transfer(), which moves a piece list to
 * or from one peer's data server over K streams, one contiguous part per stream, run as tasks of
 * the shared worker pool (dxl_pool.c), and its stream threshold. API: native/dxl.h; frames:
 * dxl_tcp_wire.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>

#include "dxl.h"
#include "dxl_internal.h"
#include "dxl_tcp_internal.h"

/* Fewest bytes worth one more stream. Loopback on a 2-core VM (benchmarks/tcp_vs_raw_socket.py)
 * gains nothing from more streams; across a network several flows help: from 4 MiB a call uses
 * two. */
#define DXL__STREAM_MIN_DEFAULT (4u << 20)
/* How often a stream waiting in poll looks whether another stream failed. */
#define DXL__POLL_SLICE_MS 50
/* Internal: this stream stopped because another one failed. */
#define DXL__ABORTED 1
#define DXL__CUT_ALIGN 4096u

static uint64_t dxl__stream_min = DXL__STREAM_MIN_DEFAULT;
static uint64_t dxl__next_request_id = 1;

uint64_t dxl_tcp_stream_threshold(uint64_t min_bytes_per_stream)
{
    if (min_bytes_per_stream == 0) {
        return __atomic_load_n(&dxl__stream_min, __ATOMIC_RELAXED);
    }
    return __atomic_exchange_n(&dxl__stream_min, min_bytes_per_stream, __ATOMIC_RELAXED);
}

static uint64_t dxl__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

typedef struct {
    /* in */
    int index;
    int fd;
    int write;
    const uint64_t *local;
    const uint64_t *remote;
    const uint64_t *len;
    dxl__pos_t begin;
    dxl__pos_t end;
    uint64_t deadline; /* CLOCK_MONOTONIC ns, 0: none */
    int *stop;         /* shared: set by the first stream that fails */
    int *first;        /* shared: index of that stream */
    /* state */
    int blocking;  /* fd is in blocking mode: wait inside the syscalls, bounded by SO_*TIMEO */
    int timeo_ms;  /* the SO_RCVTIMEO/SO_SNDTIMEO now set on fd by us, -1: not touched */
    struct timeval saved_rcv;
    struct timeval saved_snd;
    /* out */
    uint64_t done;
    int rc;
    int err;
    int broken;
    int32_t remote_status;
    uint32_t remote_detail;
} dxl__stream_t;

/* Waits until s->fd is ready for `events` (or in error), the deadline passes or another stream
 * failed: DXL_OK, DXL_E_TIMEDOUT, DXL__ABORTED or an errno code. */
static int dxl__wait(dxl__stream_t *s, short events)
{
    for (;;) {
        struct pollfd p = {.fd = s->fd, .events = events, .revents = 0};
        int slice = DXL__POLL_SLICE_MS;
        int r;

        if (__atomic_load_n(s->stop, __ATOMIC_RELAXED)) {
            return DXL__ABORTED;
        }
        if (s->deadline != 0) {
            uint64_t now = dxl__now_ns();
            uint64_t left_ms;
            if (now >= s->deadline) {
                return DXL_E_TIMEDOUT;
            }
            left_ms = (s->deadline - now + 999999) / 1000000;
            slice = left_ms < (uint64_t)slice ? (int)left_ms : slice;
        }
        r = poll(&p, 1, slice);
        if (r > 0) {
            return DXL_OK; /* ready, or POLLERR/POLLHUP: the next syscall says which */
        }
        if (r < 0 && errno != EINTR) {
            s->err = errno;
            return dxl__sock_code(errno);
        }
    }
}

/* Blocking sockets: how long the next syscall may wait (the poll slice, or less before the
 * deadline), set as SO_RCVTIMEO and SO_SNDTIMEO when it changes. DXL_OK, DXL_E_TIMEDOUT or
 * DXL__ABORTED. */
static int dxl__arm_timeo(dxl__stream_t *s)
{
    int ms = DXL__POLL_SLICE_MS;

    if (__atomic_load_n(s->stop, __ATOMIC_RELAXED)) {
        return DXL__ABORTED;
    }
    if (s->deadline != 0) {
        uint64_t now = dxl__now_ns();
        uint64_t left_ms;
        if (now >= s->deadline) {
            return DXL_E_TIMEDOUT;
        }
        left_ms = (s->deadline - now + 999999) / 1000000;
        ms = left_ms < (uint64_t)ms ? (int)left_ms : ms;
    }
    if (ms != s->timeo_ms) {
        struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
        socklen_t tl = sizeof(tv);
        if (s->timeo_ms < 0 &&
            (getsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &s->saved_rcv, &tl) != 0 ||
             getsockopt(s->fd, SOL_SOCKET, SO_SNDTIMEO, &s->saved_snd, &tl) != 0)) {
            s->blocking = 0; /* cannot bound the wait: fall back to poll */
            return DXL_OK;
        }
        if (setsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
            setsockopt(s->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
            s->blocking = 0;
        }
        s->timeo_ms = ms;
    }
    return DXL_OK;
}

/* Sends (send = 1) or receives all bytes of iov[0 .. cnt), which it consumes, in syscalls of up
 * to DXL_IOV_MAX entries, resuming partial ones at the exact byte. A blocking socket waits inside
 * the syscall (MSG_WAITALL for receives: one syscall per batch, as a plain blocking reader), for
 * at most the poll slice at a time; a non-blocking one waits in poll. Either way the stop flag
 * and the deadline are looked at between waits. Received bytes are added to *moved_p if not
 * NULL. DXL_OK, DXL_E_PEER on EOF, or a failure code. */
static int dxl__io_all(dxl__stream_t *s, struct iovec *iov, size_t cnt, int send,
                       uint64_t *moved_p)
{
    size_t i = 0;

    while (i < cnt && iov[i].iov_len == 0) {
        i++;
    }
    while (i < cnt) {
        size_t left = cnt - i;
        struct msghdr m = {.msg_iov = iov + i,
                           .msg_iovlen = left < DXL_IOV_MAX ? left : DXL_IOV_MAX};
        int flags = send ? MSG_NOSIGNAL : 0;
        ssize_t r;

        if (__atomic_load_n(s->stop, __ATOMIC_RELAXED)) {
            return DXL__ABORTED;
        }
        if (s->blocking) {
            int rc = dxl__arm_timeo(s);
            if (rc != DXL_OK) {
                return rc;
            }
        }
        if (s->blocking) {
            flags |= send ? 0 : MSG_WAITALL;
        } else {
            flags |= MSG_DONTWAIT;
        }
        r = send ? sendmsg(s->fd, &m, flags) : recvmsg(s->fd, &m, flags);
        if (r < 0) {
            int e = errno;
            int rc;
            if (e == EINTR) {
                continue;
            }
            if (e != EAGAIN && e != EWOULDBLOCK) {
                s->err = e;
                return dxl__sock_code(e);
            }
            if (s->blocking) {
                continue; /* the slice passed with nothing moved: look at stop and deadline */
            }
            rc = dxl__wait(s, send ? POLLOUT : POLLIN);
            if (rc != DXL_OK) {
                return rc;
            }
            continue;
        }
        if (r == 0) {
            s->err = 0;
            return DXL_E_PEER; /* EOF before the frame was complete */
        }
        if (moved_p != NULL) {
            *moved_p += (uint64_t)r;
        }
        dxl__iov_advance(iov, cnt, &i, (size_t)r);
        while (i < cnt && iov[i].iov_len == 0) {
            i++;
        }
    }
    return DXL_OK;
}

/* Checks a reply against its request: DXL_OK, DXL_E_REMOTE (a refusal, recorded in s) or
 * DXL_E_PROTO. */
static int dxl__check_reply(dxl__stream_t *s, const unsigned char *b, uint16_t op, uint64_t id,
                            uint64_t bytes)
{
    dxl__rep_t rep = dxl__rep_decode(b);
    int rc = dxl__rep_check(&rep, op, id, bytes);

    if (rc == DXL_E_REMOTE) {
        s->remote_status = rep.status;
        s->remote_detail = rep.detail;
    }
    return rc;
}

/* After a failed send: if the server has already answered (it refuses a malformed request and
 * closes), read its verdict without waiting, for a better error than a reset. */
static int dxl__salvage_reply(dxl__stream_t *s, uint16_t op, uint64_t id, int rc)
{
    unsigned char b[DXL_TCP_HDR_BYTES];
    ssize_t r;

    do {
        r = recv(s->fd, b, sizeof(b), MSG_DONTWAIT | MSG_PEEK);
    } while (r < 0 && errno == EINTR);
    if (r == (ssize_t)sizeof(b) && dxl__check_reply(s, b, op, id, 0) == DXL_E_REMOTE) {
        return DXL_E_REMOTE;
    }
    return rc;
}

/* Counts the table entries [begin, end) needs, stopping at `cap`. */
static uint64_t dxl__count_entries(const dxl__stream_t *s, uint64_t cap)
{
    dxl__pos_t p = s->begin;
    uint64_t count = 0;

    while (count < cap && !dxl__pos_done(&p, &s->end)) {
        uint64_t left = dxl__piece_left(&p, &s->end, s->len);
        if (left == 0) {
            p.piece++;
            p.off = 0;
            continue;
        }
        count += (left + DXL_TCP_MAX_PIECE_LEN - 1) / DXL_TCP_MAX_PIECE_LEN;
        p.piece++;
        p.off = 0;
    }
    return count < cap ? count : cap;
}

/* Moves [begin, end) on one stream, as requests of at most DXL_TCP_MAX_PIECES entries. */
static int dxl__stream_move(dxl__stream_t *s)
{
    const uint16_t op = s->write ? DXL_TCP_OP_WRITE : DXL_TCP_OP_READ;
    uint64_t cap = dxl__count_entries(s, DXL_TCP_MAX_PIECES);
    unsigned char hreq[DXL_TCP_HDR_BYTES];
    unsigned char hrep[DXL_TCP_HDR_BYTES];
    unsigned char *table;
    struct iovec *iov;
    dxl__pos_t pos = s->begin;
    int rc = DXL_OK;

    if (cap == 0) {
        return DXL_OK;
    }
    table = malloc((size_t)cap * DXL__TCP_ENTRY_BYTES);
    iov = malloc((size_t)(cap + 2) * sizeof(*iov));
    if (table == NULL || iov == NULL) {
        free(table);
        free(iov);
        s->err = ENOMEM;
        return DXL_E_NOMEM;
    }
    while (rc == DXL_OK && !dxl__pos_done(&pos, &s->end)) {
        dxl__pos_t p = pos;
        uint64_t m = 0;
        uint64_t bytes = 0;
        uint64_t id = __atomic_fetch_add(&dxl__next_request_id, 1, __ATOMIC_RELAXED);
        struct iovec rep = {.iov_base = hrep, .iov_len = sizeof(hrep)};

        while (m < cap && !dxl__pos_done(&p, &s->end)) {
            uint64_t left = dxl__piece_left(&p, &s->end, s->len);
            uint64_t chunk = left < DXL_TCP_MAX_PIECE_LEN ? left : DXL_TCP_MAX_PIECE_LEN;
            if (left == 0) {
                p.piece++;
                p.off = 0;
                continue;
            }
            dxl__entry_put(table, m, s->remote[p.piece] + p.off, chunk);
            iov[2 + m] = (struct iovec){.iov_base = (void *)(uintptr_t)(s->local[p.piece] + p.off),
                                        .iov_len = (size_t)chunk};
            m++;
            bytes += chunk;
            p.off += chunk;
        }
        if (m == 0) {
            break;
        }
        dxl__req_encode(hreq, op, id, m, bytes);
        iov[0] = (struct iovec){.iov_base = hreq, .iov_len = sizeof(hreq)};
        iov[1] = (struct iovec){.iov_base = table, .iov_len = (size_t)m * DXL__TCP_ENTRY_BYTES};

        /* READ: header + table out, reply header in, data scattered into local memory.
         * WRITE: header + table + data gathered from local memory out, reply header in. */
        rc = dxl__io_all(s, iov, s->write ? m + 2 : 2, 1, NULL);
        if (rc == DXL_E_PEER) {
            rc = dxl__salvage_reply(s, op, id, rc);
            break;
        }
        if (rc == DXL_OK) {
            rc = dxl__io_all(s, &rep, 1, 0, NULL);
        }
        if (rc == DXL_OK) {
            rc = dxl__check_reply(s, hrep, op, id, bytes);
        }
        if (rc == DXL_OK && !s->write) {
            rc = dxl__io_all(s, iov + 2, m, 0, &s->done);
        } else if (rc == DXL_OK) {
            s->done += bytes;
        }
        pos = p;
    }
    free(table);
    free(iov);
    return rc;
}

static void dxl__stream_run(dxl__stream_t *s)
{
    int flags = fcntl(s->fd, F_GETFL);
    int rc;

    s->blocking = flags >= 0 && !(flags & O_NONBLOCK);
    s->timeo_ms = -1;
    rc = dxl__stream_move(s);
    if (s->timeo_ms >= 0) { /* leave the socket as the caller gave it */
        (void)setsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &s->saved_rcv, sizeof(s->saved_rcv));
        (void)setsockopt(s->fd, SOL_SOCKET, SO_SNDTIMEO, &s->saved_snd, sizeof(s->saved_snd));
    }

    s->rc = rc;
    if (rc == DXL_OK) {
        return;
    }
    /* Only a refusal of a well-formed request (the server keeps the connection) leaves the stream
     * at a frame boundary; anything else leaves it mid-frame or closed. */
    s->broken = !(rc == DXL_E_REMOTE && s->remote_status == DXL_E_RANGE);
    if (rc != DXL__ABORTED) {
        int none = -1;
        __atomic_compare_exchange_n(s->first, &none, s->index, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_RELAXED);
        __atomic_store_n(s->stop, 1, __ATOMIC_RELAXED);
    }
}

/* A task of the shared worker pool: stream j of the array ctx. Streams are independent (each
 * waits only for its own connection's server side), so the pool may run them in any order, on
 * fewer threads than streams. */
static void dxl__stream_task(void *ctx, uint64_t j)
{
    dxl__stream_t *st = ctx;

    dxl__stream_run(&st[j]);
}

int dxl_tcp_transfer(const int *fds, int nfds, int write, const uint64_t *local,
                     const uint64_t *remote, const uint64_t *len, uint64_t n, int timeout_ms,
                     dxl_tcp_result_t *result_p)
{
    dxl__stream_t st[DXL_TCP_MAX_STREAMS];
    dxl__pos_t bounds[DXL_TCP_MAX_STREAMS + 1];
    uint64_t total = 0;
    uint64_t k;
    uint64_t deadline = 0;
    int stop = 0;
    int first = -1;
    int rc;

    if (result_p == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    memset(result_p, 0, sizeof(*result_p));
    if (fds == NULL || nfds < 1 || nfds > DXL_TCP_MAX_STREAMS || (write != 0 && write != 1) ||
        timeout_ms == 0) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    for (int i = 0; i < nfds; i++) {
        if (fds[i] < 0) {
            return dxl__fail(DXL_E_INVAL, 0);
        }
    }
    rc = dxl__pieces_total(local, remote, len, n, &total);
    if (rc != DXL_OK || total == 0) {
        return rc;
    }

    k = total / __atomic_load_n(&dxl__stream_min, __ATOMIC_RELAXED);
    k = k > (uint64_t)nfds ? (uint64_t)nfds : k;
    k = k < 1 ? 1 : k;
    if (timeout_ms > 0) {
        deadline = dxl__now_ns() + (uint64_t)timeout_ms * 1000000ull;
    }
    for (uint64_t j = 0; j < k; j++) {
        st[j] = (dxl__stream_t){.index = (int)j,
                                .fd = fds[j],
                                .write = write,
                                .local = local,
                                .remote = remote,
                                .len = len,
                                .deadline = deadline,
                                .stop = &stop,
                                .first = &first};
    }
    dxl__cut_bytes(bounds, k, len, n, total, DXL__CUT_ALIGN);
    for (uint64_t j = 0; j < k; j++) {
        st[j].begin = bounds[j];
        st[j].end = bounds[j + 1];
    }

    DXL__ADD(dxl__n_inflight, 1);
    /* The calling thread takes stream 0; the pool's workers (at most DXL_MAX_THREADS - 1, shared
     * with the cma path) take the others as they are free, and the calling thread moves any
     * stream none has picked up itself, after its own. With a busy pool that is slower than a
     * thread per stream, never stuck; and no call pays for creating threads. */
    dxl__pool_run(k, (int)k - 1, dxl__stream_task, st);
    DXL__SUB(dxl__n_inflight, 1);

    result_p->streams_used = (int)k;
    for (uint64_t j = 0; j < k; j++) {
        result_p->bytes_done += st[j].done;
        if (st[j].broken) {
            result_p->broken_mask |= 1ull << j;
        }
    }
    if (first < 0) {
        return DXL_OK;
    }
    result_p->remote_status = st[first].remote_status;
    result_p->remote_detail = st[first].remote_detail;
    return dxl__fail(st[first].rc, st[first].err);
}
