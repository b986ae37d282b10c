/*
 * dxl_tcp_server.c: the tcp transport's data server. Threads with epoll serve connections that
 * Python accepted and authenticated (dxl_tcp_server_adopt), answering READ and WRITE requests
 * against registered memory; start, adopt, revoke, fence, stats and stop are the API
 * (native/dxl.h).
 * Frames are decoded by dxl_tcp_wire.c.
 *
 * Safety argument, in one place: a request's table is read completely, then dxl__srv_check()
 * (the only function that turns peer input into permission) validates every entry and the byte
 * total and asks the server's own region registry (the one it was started with, never another)
 * about every piece; only after DXL_OK are iovecs over those addresses built (dxl__srv_on_table).
 * Nothing else in the tcp transport builds an iovec from peer input. Refused WRITE payloads go to
 * a per-thread scratch buffer.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "dxl.h"
#include "dxl_internal.h"
#include "dxl_tcp_internal.h"

static void dxl__block_signals(sigset_t *old)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, old);
}

#define DXL__SRV_EVENTS 64
/* Syscalls one connection may make per wakeup before the thread turns to the next ready one. */
#define DXL__SRV_BUDGET 16
#define DXL__SRV_SCRATCH (64u << 10)
/* Pieces a connection's request table has room for when adopted, and again after any request
 * whose table needed more than DXL_TCP_CONN_BUF_KEEP bytes (about 2 KiB). */
#define DXL__SRV_INIT_PIECES 63
/* First guess of the bytes one readv/sendmsg moves (see dxl__srv_iov_batch). */
#define DXL__SRV_IO_HINT (128u << 10)

enum {
    DXL__ST_HDR,   /* reading a request header */
    DXL__ST_TABLE, /* reading its table */
    DXL__ST_RECV,  /* WRITE: reading the payload into validated memory */
    DXL__ST_DRAIN, /* refused WRITE: reading the payload into scratch */
    DXL__ST_SEND,  /* sending a reply (READ: header + data from validated memory) */
};

typedef struct dxl__srv_thread dxl__srv_thread_t;

_Static_assert(sizeof(struct iovec) >= DXL__TCP_ENTRY_BYTES, "a raw table fits in iov[1 .. n]");

typedef struct dxl__conn {
    struct dxl__conn *next; /* live list of th (th->mu) */
    struct dxl__conn *prev;
    struct dxl__conn *dead_next;
    dxl__srv_thread_t *th;
    int fd;
    int state;
    uint32_t interest; /* current epoll events */
    int closed;        /* on the dead list; its events in the current batch are ignored */
    int close_after;   /* close once the reply is sent (malformed request) */
    int serving;       /* a READ's data is being sent */
    int busy;          /* th->mu: touching registered memory (READ send, WRITE receive); written
                          by its thread only, which may read it without the lock */
    int revoked;       /* th->mu; its thread reads it atomically: dxl_tcp_server_revoke named its
                          tag, so no new request starts and the thread closes it once not busy */
    uint64_t tag;      /* given at adoption (dxl_tcp_server_revoke) */
    int fenced;        /* th->mu: dxl_tcp_server_fence waits for this request */
    int abort;         /* th->mu: dxl_tcp_server_fence timed out: close it */
    unsigned char hdr[DXL_TCP_HDR_BYTES];
    size_t hdr_got;
    unsigned char rhdr[DXL_TCP_HDR_BYTES];
    dxl__req_t req;
    /* iov[0] is the reply header of a READ; the raw table is read into the bytes of iov[1 ..]
     * and decoded into al (addresses al[0 .. n), lengths al[n .. 2n)) before iov is built. */
    struct iovec *iov;
    uint64_t cap; /* pieces iov and al have room for (iov: cap + 1 entries) */
    uint64_t *al;
    size_t raw_got;
    size_t raw_need;
    size_t iov_cnt;
    size_t iov_pos;
    uint64_t drain_left;
    int32_t rep_status;
    uint32_t rep_detail;
    size_t io_hint; /* most bytes one readv/sendmsg moved on this connection */
    size_t buf_bytes; /* bytes of iov + al, counted in the server's buffer_bytes once adopted */
} dxl__conn_t;

struct dxl__srv_thread {
    dxl_tcp_server_t *srv;
    pthread_t tid;
    int started;
    int ep;
    int evfd;
    pthread_mutex_t mu;
    dxl__conn_t *conns; /* mu */
    uint64_t nconns;    /* mu */
    dxl__conn_t *dead;  /* this thread only */
    unsigned char *scratch;
};

struct dxl_tcp_server {
    dxl_registry_t *reg; /* what requests are checked against (the caller's, outlives us) */
    pthread_mutex_t mu;  /* adopt vs stop */
    int stopping;       /* written under mu, read atomically */
    int nthreads;
    dxl__srv_thread_t th[DXL_TCP_MAX_THREADS];
    pthread_mutex_t fence_mu; /* one fence at a time */
    pthread_mutex_t fmu;
    pthread_cond_t fcv;
    int64_t fpending; /* fmu: fenced requests not yet finished */
    /* counters (atomic) */
    uint64_t conns_adopted;
    uint64_t conns_live;
    uint64_t conns_dropped;
    uint64_t requests_served;
    uint64_t requests_rejected;
    uint64_t bytes_sent;
    uint64_t bytes_received;
    uint64_t requests_aborted;
    uint64_t conns_revoked;
    uint64_t conns_refused;
    uint64_t buffer_bytes;
};

static uint64_t dxl__n_tcp_servers;

uint64_t dxl_tcp_servers_live(void)
{
    return __atomic_load_n(&dxl__n_tcp_servers, __ATOMIC_RELAXED);
}

/* ---- the gate ---- */

/* Every check a request passes before its memory is touched. addr/len are the decoded table.
 * DXL_E_PROTO (malformed: an entry longer than DXL_TCP_MAX_PIECE_LEN, a range that wraps, lens
 * that do not sum to total), DXL_E_RANGE (well-formed, but some piece is not inside one region of
 * the registry), or DXL_OK. *bad_p: the offending entry (0 for a wrong total). */
static int dxl__srv_check(dxl_registry_t *reg, const uint64_t *addr, const uint64_t *len,
                          uint64_t n, uint64_t total, uint64_t *bad_p)
{
    uint64_t sum = 0;

    *bad_p = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (len[i] > DXL_TCP_MAX_PIECE_LEN || addr[i] > UINT64_MAX - len[i] ||
            sum > UINT64_MAX - len[i]) {
            *bad_p = i;
            return DXL_E_PROTO;
        }
        sum += len[i];
    }
    if (sum != total) {
        return DXL_E_PROTO;
    }
    if (dxl_region_check_pieces(reg, addr, len, n, bad_p) != DXL_OK) {
        return DXL_E_RANGE;
    }
    return DXL_OK;
}

/* ---- fence bookkeeping ---- */

static void dxl__fence_release(dxl_tcp_server_t *srv)
{
    pthread_mutex_lock(&srv->fmu);
    srv->fpending--;
    pthread_cond_broadcast(&srv->fcv);
    pthread_mutex_unlock(&srv->fmu);
}

/* Marks c busy (touching registered memory) or not. Returns 1, or 0 (and c stays not busy) when
 * asked to mark it busy after dxl_tcp_server_revoke named it: under th->mu, so a revoke that has
 * returned is seen here and no request starts after it. */
static int dxl__srv_set_busy(dxl__conn_t *c, int busy)
{
    int released;

    pthread_mutex_lock(&c->th->mu);
    if (busy && c->revoked) {
        pthread_mutex_unlock(&c->th->mu);
        return 0;
    }
    c->busy = busy;
    released = !busy && c->fenced;
    if (released) {
        c->fenced = 0;
        c->abort = 0;
    }
    pthread_mutex_unlock(&c->th->mu);
    if (released) {
        dxl__fence_release(c->th->srv);
    }
    return 1;
}

/* 1 if c was revoked and runs no request: its thread closes it now. */
static int dxl__srv_revoked_idle(const dxl__conn_t *c)
{
    return __atomic_load_n(&c->revoked, __ATOMIC_ACQUIRE) && !c->busy;
}

/* ---- connections ---- */

/* Why a connection is closed (dxl__srv_close), for the counters. */
enum {
    DXL__CLOSE_CLEAN,   /* EOF at a frame boundary, or the server stops */
    DXL__CLOSE_DROPPED, /* malformed request, I/O error, EOF mid-frame, fence timeout */
    DXL__CLOSE_REVOKED, /* dxl_tcp_server_revoke */
};

static void dxl__srv_close(dxl__conn_t *c, int why)
{
    dxl__srv_thread_t *th = c->th;
    dxl_tcp_server_t *srv = th->srv;
    int fenced;

    /* Counters first: a peer that sees the close sees them updated. */
    DXL__SUB(srv->conns_live, 1);
    if (why == DXL__CLOSE_DROPPED) {
        DXL__ADD(srv->conns_dropped, 1);
    } else if (why == DXL__CLOSE_REVOKED) {
        DXL__ADD(srv->conns_revoked, 1);
    }
    (void)epoll_ctl(th->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    pthread_mutex_lock(&th->mu);
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        th->conns = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    }
    th->nconns--;
    fenced = c->fenced;
    c->fenced = 0;
    c->busy = 0;
    pthread_mutex_unlock(&th->mu);
    c->closed = 1;
    c->dead_next = th->dead;
    th->dead = c;
    if (fenced) {
        dxl__fence_release(srv); /* last: the fence's caller sees the counters updated */
    }
}

/* Frees c and its buffers; srv (NULL: c was never counted) loses their bytes. */
static void dxl__conn_free(dxl_tcp_server_t *srv, dxl__conn_t *c)
{
    if (srv != NULL) {
        DXL__SUB(srv->buffer_bytes, c->buf_bytes);
    }
    free(c->iov);
    free(c->al);
    free(c);
}

/* Bytes of the buffers for a table of n pieces: iov (n + 1 entries) and al (2n entries). */
static size_t dxl__srv_buf_bytes(uint64_t n)
{
    return (size_t)(n + 1) * sizeof(struct iovec) + (size_t)(n > 0 ? 2 * n : 1) * sizeof(uint64_t);
}

/* Buffers with room for exactly n pieces, replacing the old ones; srv (NULL: not counted yet)
 * follows the change in bytes. DXL_OK or DXL_E_NOMEM (the old buffers stay). */
static int dxl__srv_resize(dxl_tcp_server_t *srv, dxl__conn_t *c, uint64_t n)
{
    struct iovec *iov = malloc((size_t)(n + 1) * sizeof(*iov));
    uint64_t *al = malloc((size_t)(n > 0 ? 2 * n : 1) * sizeof(*al));
    size_t bytes = dxl__srv_buf_bytes(n);

    if (iov == NULL || al == NULL) {
        free(iov);
        free(al);
        return DXL_E_NOMEM;
    }
    free(c->iov);
    free(c->al);
    if (srv != NULL) {
        DXL__ADD(srv->buffer_bytes, bytes);
        DXL__SUB(srv->buffer_bytes, c->buf_bytes);
    }
    c->iov = iov;
    c->al = al;
    c->cap = n;
    c->buf_bytes = bytes;
    return DXL_OK;
}

/* Room for n pieces; DXL_OK or DXL_E_NOMEM (the old buffers stay). */
static int dxl__srv_reserve(dxl_tcp_server_t *srv, dxl__conn_t *c, uint64_t n)
{
    if (n <= c->cap && c->iov != NULL) {
        return DXL_OK;
    }
    return dxl__srv_resize(srv, c, n);
}

/* After a request: a connection keeps at most DXL_TCP_CONN_BUF_KEEP bytes of table buffers, so
 * that an idle one holds little memory (one large request would otherwise pin ~2 MiB). */
static void dxl__srv_trim(dxl__conn_t *c)
{
    if (c->buf_bytes > DXL_TCP_CONN_BUF_KEEP) {
        (void)dxl__srv_resize(c->th->srv, c, DXL__SRV_INIT_PIECES); /* NOMEM: keep the old */
    }
}

static void dxl__srv_interest(dxl__conn_t *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};

    if (c->interest != events && epoll_ctl(c->th->ep, EPOLL_CTL_MOD, c->fd, &ev) == 0) {
        c->interest = events;
    }
}

/* Queues a reply header alone (an error, or a WRITE's confirmation). */
static void dxl__srv_reply(dxl__conn_t *c, int32_t status, uint32_t detail, uint64_t total)
{
    dxl__rep_encode(c->rhdr, c->req.op, c->req.id, status, detail, total);
    c->iov[0] = (struct iovec){.iov_base = c->rhdr, .iov_len = DXL_TCP_HDR_BYTES};
    c->iov_cnt = 1;
    c->iov_pos = 0;
    c->state = DXL__ST_SEND;
}

/* A malformed request: reply with status, then close this connection. */
static void dxl__srv_malformed(dxl__conn_t *c, int32_t status, uint32_t detail)
{
    DXL__ADD(c->th->srv->requests_rejected, 1);
    c->close_after = 1;
    dxl__srv_reply(c, status, detail, 0);
}

static void dxl__srv_recv_done(dxl__conn_t *c)
{
    dxl_tcp_server_t *srv = c->th->srv;

    dxl__srv_set_busy(c, 0);
    DXL__ADD(srv->requests_served, 1);
    DXL__ADD(srv->bytes_received, c->req.total);
    dxl__srv_reply(c, DXL_OK, 0, c->req.total);
}

/* The table is in: decode, check, then (and only then) aim iovecs at the memory. */
static void dxl__srv_on_table(dxl__conn_t *c)
{
    const unsigned char *raw = (const unsigned char *)(c->iov + 1);
    uint64_t n = c->req.n;
    uint64_t *addr = c->al;
    uint64_t *len = c->al + n;
    uint64_t bad = 0;
    size_t k = 0;
    int rc;

    for (uint64_t i = 0; i < n; i++) {
        dxl__entry_get(raw, i, &addr[i], &len[i]);
    }
    /* Busy before the check, so that dxl_tcp_server_fence either sees this request or runs
     * before the check (and then after the dxl_region_remove it fences, which the check sees).
     * A revoked connection starts nothing: it is closed, unanswered. */
    if (!dxl__srv_set_busy(c, 1)) {
        dxl__srv_close(c, DXL__CLOSE_REVOKED);
        return;
    }
    rc = dxl__srv_check(c->th->srv->reg, addr, len, n, c->req.total, &bad);
    if (rc != DXL_OK) {
        dxl__srv_set_busy(c, 0);
    }
    if (rc == DXL_E_PROTO) {
        dxl__srv_malformed(c, DXL_E_PROTO, (uint32_t)bad);
        return;
    }
    if (rc != DXL_OK) {
        /* Well-formed but refused: the stream stays in step. A WRITE's payload is still coming:
         * read it into scratch, then reply. */
        DXL__ADD(c->th->srv->requests_rejected, 1);
        if (c->req.op == DXL_TCP_OP_WRITE && c->req.total > 0) {
            c->rep_status = rc;
            c->rep_detail = (uint32_t)bad;
            c->drain_left = c->req.total;
            c->state = DXL__ST_DRAIN;
        } else {
            dxl__srv_reply(c, rc, (uint32_t)bad, 0);
        }
        return;
    }

    /* Checked: build the iovecs over the peer's ranges. */
    if (c->req.op == DXL_TCP_OP_READ) {
        dxl__rep_encode(c->rhdr, c->req.op, c->req.id, DXL_OK, 0, c->req.total);
        c->iov[k++] = (struct iovec){.iov_base = c->rhdr, .iov_len = DXL_TCP_HDR_BYTES};
    }
    for (uint64_t i = 0; i < n; i++) {
        if (len[i] > 0) {
            c->iov[k++] = (struct iovec){.iov_base = (void *)(uintptr_t)addr[i],
                                         .iov_len = (size_t)len[i]};
        }
    }
    c->iov_cnt = k;
    c->iov_pos = 0;
    if (c->req.op == DXL_TCP_OP_READ) {
        c->serving = 1;
        c->state = DXL__ST_SEND;
    } else if (k > 0) {
        c->state = DXL__ST_RECV;
    } else {
        dxl__srv_recv_done(c);
    }
}

static void dxl__srv_on_header(dxl__conn_t *c)
{
    int rc;

    c->req = dxl__req_decode(c->hdr);
    rc = dxl__req_check(&c->req);
    if (rc != DXL_OK) {
        dxl__srv_malformed(c, rc, 0);
    } else if (dxl__srv_reserve(c->th->srv, c, c->req.n) != DXL_OK) {
        dxl__srv_malformed(c, DXL_E_NOMEM, 0);
    } else {
        c->raw_got = 0;
        c->raw_need = (size_t)c->req.n * DXL__TCP_ENTRY_BYTES;
        c->state = DXL__ST_TABLE;
        if (c->raw_need == 0) {
            dxl__srv_on_table(c);
        }
    }
}

static void dxl__srv_send_done(dxl__conn_t *c)
{
    dxl_tcp_server_t *srv = c->th->srv;

    if (c->serving) {
        c->serving = 0;
        dxl__srv_set_busy(c, 0);
        DXL__ADD(srv->requests_served, 1);
        DXL__ADD(srv->bytes_sent, c->req.total);
    }
    c->hdr_got = 0;
    c->state = DXL__ST_HDR;
    dxl__srv_trim(c);
}

/* After a recv-like call returned r <= 0: 0 would block, 1 retry, -1 closed. EOF at a frame
 * boundary (`clean`) is an orderly close. */
static int dxl__srv_rerr(dxl__conn_t *c, ssize_t r, int clean)
{
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return 0;
    }
    if (r < 0 && errno == EINTR) {
        return 1;
    }
    dxl__srv_close(c, r == 0 && clean ? DXL__CLOSE_CLEAN : DXL__CLOSE_DROPPED);
    return -1;
}

/* How many iovecs from iov_pos to hand the next readv/sendmsg: enough for twice the most bytes
 * one call has moved so far (the socket buffer rarely takes more), at most DXL_IOV_MAX. The kernel
 * copies in and checks every entry it is given on each call, so passing 1024 entries of 4 KiB to
 * a call that moves 256 KiB would cost more than the bytes. */
static int dxl__srv_iov_batch(const dxl__conn_t *c)
{
    size_t want = 2 * c->io_hint;
    size_t sum = 0;
    size_t i = c->iov_pos;

    while (i < c->iov_cnt && i - c->iov_pos < DXL_IOV_MAX && sum < want) {
        sum += c->iov[i].iov_len;
        i++;
    }
    return (int)(i - c->iov_pos);
}

/* One non-blocking syscall on c: 1 progress, 0 would block, -1 closed. */
static int dxl__srv_step(dxl__conn_t *c)
{
    ssize_t r;

    switch (c->state) {
    case DXL__ST_HDR:
        r = recv(c->fd, c->hdr + c->hdr_got, DXL_TCP_HDR_BYTES - c->hdr_got, 0);
        if (r <= 0) {
            return dxl__srv_rerr(c, r, c->hdr_got == 0);
        }
        c->hdr_got += (size_t)r;
        if (c->hdr_got == DXL_TCP_HDR_BYTES) {
            dxl__srv_on_header(c);
        }
        return c->closed ? -1 : 1; /* an empty table went through the gate: maybe revoked */
    case DXL__ST_TABLE:
        r = recv(c->fd, (unsigned char *)(c->iov + 1) + c->raw_got, c->raw_need - c->raw_got, 0);
        if (r <= 0) {
            return dxl__srv_rerr(c, r, 0);
        }
        c->raw_got += (size_t)r;
        if (c->raw_got == c->raw_need) {
            dxl__srv_on_table(c);
        }
        return c->closed ? -1 : 1; /* revoked at the gate */
    case DXL__ST_RECV:
        r = readv(c->fd, c->iov + c->iov_pos, dxl__srv_iov_batch(c));
        if (r <= 0) {
            return dxl__srv_rerr(c, r, 0);
        }
        c->io_hint = (size_t)r > c->io_hint ? (size_t)r : c->io_hint;
        dxl__iov_advance(c->iov, c->iov_cnt, &c->iov_pos, (size_t)r);
        if (c->iov_pos == c->iov_cnt) {
            dxl__srv_recv_done(c);
        }
        return 1;
    case DXL__ST_DRAIN: {
        size_t want = c->drain_left < DXL__SRV_SCRATCH ? (size_t)c->drain_left : DXL__SRV_SCRATCH;
        r = recv(c->fd, c->th->scratch, want, 0);
        if (r <= 0) {
            return dxl__srv_rerr(c, r, 0);
        }
        c->drain_left -= (uint64_t)r;
        if (c->drain_left == 0) {
            dxl__srv_reply(c, c->rep_status, c->rep_detail, 0);
        }
        return 1;
    }
    case DXL__ST_SEND: {
        struct msghdr m = {.msg_iov = c->iov + c->iov_pos,
                           .msg_iovlen = (size_t)dxl__srv_iov_batch(c)};
        r = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return 0;
            }
            if (errno == EINTR) {
                return 1;
            }
            /* EPIPE, ECONNRESET, or EFAULT (memory unmapped under us) */
            dxl__srv_close(c, DXL__CLOSE_DROPPED);
            return -1;
        }
        c->io_hint = (size_t)r > c->io_hint ? (size_t)r : c->io_hint;
        dxl__iov_advance(c->iov, c->iov_cnt, &c->iov_pos, (size_t)r);
        if (c->iov_pos == c->iov_cnt) {
            if (c->close_after) {
                dxl__srv_close(c, DXL__CLOSE_DROPPED);
                return -1;
            }
            dxl__srv_send_done(c);
        }
        return 1;
    }
    default:
        dxl__srv_close(c, DXL__CLOSE_DROPPED);
        return -1;
    }
}

static void dxl__srv_io(dxl__conn_t *c)
{
    for (int i = 0; i < DXL__SRV_BUDGET; i++) {
        int r;
        if (dxl__srv_revoked_idle(c)) { /* e.g. its last request just ended */
            dxl__srv_close(c, DXL__CLOSE_REVOKED);
            return;
        }
        r = dxl__srv_step(c);
        if (r < 0) {
            return;
        }
        if (r == 0) {
            break;
        }
    }
    if (dxl__srv_revoked_idle(c)) {
        dxl__srv_close(c, DXL__CLOSE_REVOKED);
        return;
    }
    dxl__srv_interest(c, c->state == DXL__ST_SEND ? EPOLLOUT : EPOLLIN);
}

/* Closes the connections that a timed-out fence marked, and the revoked ones that run no
 * request (a revoked one that does is closed by dxl__srv_io once its request ends). */
static void dxl__srv_aborts(dxl__srv_thread_t *th)
{
    for (;;) {
        dxl__conn_t *victim = NULL;
        int aborted = 0;
        int revoked = 0;
        pthread_mutex_lock(&th->mu);
        for (dxl__conn_t *c = th->conns; c != NULL; c = c->next) {
            if (c->abort || (c->revoked && !c->busy)) {
                victim = c;
                aborted = c->abort;
                revoked = c->revoked;
                break;
            }
        }
        pthread_mutex_unlock(&th->mu);
        if (victim == NULL) {
            return;
        }
        if (aborted) {
            DXL__ADD(th->srv->requests_aborted, 1);
        }
        dxl__srv_close(victim, revoked ? DXL__CLOSE_REVOKED : DXL__CLOSE_DROPPED);
    }
}

static void *dxl__srv_main(void *arg)
{
    dxl__srv_thread_t *th = arg;
    struct epoll_event evs[DXL__SRV_EVENTS];

    while (!__atomic_load_n(&th->srv->stopping, __ATOMIC_ACQUIRE)) {
        int wake = 0;
        int n = epoll_wait(th->ep, evs, DXL__SRV_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            break; /* EBADF/EINVAL: cannot happen while the server lives */
        }
        for (int i = 0; i < n; i++) {
            dxl__conn_t *c = evs[i].data.ptr;
            if (c == NULL) {
                uint64_t v;
                ssize_t r = read(th->evfd, &v, sizeof(v));
                (void)r;
                wake = 1;
            } else if (!c->closed) {
                dxl__srv_io(c);
            }
        }
        if (wake) {
            dxl__srv_aborts(th);
        }
        while (th->dead != NULL) {
            dxl__conn_t *c = th->dead;
            th->dead = c->dead_next;
            dxl__conn_free(th->srv, c);
        }
    }
    return NULL;
}

static void dxl__srv_wake(dxl__srv_thread_t *th)
{
    uint64_t one = 1;
    ssize_t r = write(th->evfd, &one, sizeof(one));
    (void)r; /* EAGAIN: the counter is already non-zero, the thread will wake anyway */
}

/* Frees everything of a server whose threads are stopped or were never started. */
static void dxl__srv_destroy(dxl_tcp_server_t *srv)
{
    for (int i = 0; i < srv->nthreads; i++) {
        dxl__srv_thread_t *th = &srv->th[i];
        while (th->conns != NULL) {
            dxl__conn_t *c = th->conns;
            th->conns = c->next;
            close(c->fd);
            dxl__conn_free(srv, c);
            DXL__SUB(srv->conns_live, 1);
        }
        while (th->dead != NULL) {
            dxl__conn_t *c = th->dead;
            th->dead = c->dead_next;
            dxl__conn_free(srv, c);
        }
        if (th->ep >= 0) {
            close(th->ep);
        }
        if (th->evfd >= 0) {
            close(th->evfd);
        }
        free(th->scratch);
        pthread_mutex_destroy(&th->mu);
    }
    pthread_mutex_destroy(&srv->mu);
    pthread_mutex_destroy(&srv->fence_mu);
    pthread_mutex_destroy(&srv->fmu);
    pthread_cond_destroy(&srv->fcv);
    free(srv);
}

static void dxl__srv_join(dxl_tcp_server_t *srv)
{
    pthread_mutex_lock(&srv->mu);
    __atomic_store_n(&srv->stopping, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&srv->mu);
    for (int i = 0; i < srv->nthreads; i++) {
        if (srv->th[i].started) {
            dxl__srv_wake(&srv->th[i]);
        }
    }
    for (int i = 0; i < srv->nthreads; i++) {
        if (srv->th[i].started) {
            pthread_join(srv->th[i].tid, NULL);
            srv->th[i].started = 0;
        }
    }
}

int dxl_tcp_server_start(int threads, dxl_registry_t *registry, dxl_tcp_server_t **server_p)
{
    dxl_tcp_server_t *srv;
    pthread_condattr_t ca;
    sigset_t old;
    int rc = DXL_OK;
    int err = 0;

    if (server_p == NULL || registry == NULL || threads < 1 || threads > DXL_TCP_MAX_THREADS) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    srv = calloc(1, sizeof(*srv));
    if (srv == NULL) {
        return dxl__fail(DXL_E_NOMEM, ENOMEM);
    }
    pthread_mutex_init(&srv->mu, NULL);
    pthread_mutex_init(&srv->fence_mu, NULL);
    pthread_mutex_init(&srv->fmu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&srv->fcv, &ca);
    pthread_condattr_destroy(&ca);
    srv->nthreads = threads;
    srv->reg = registry;

    for (int i = 0; i < threads && rc == DXL_OK; i++) {
        dxl__srv_thread_t *th = &srv->th[i];
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        th->srv = srv;
        pthread_mutex_init(&th->mu, NULL);
        th->ep = epoll_create1(EPOLL_CLOEXEC);
        th->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        th->scratch = malloc(DXL__SRV_SCRATCH);
        if (th->ep < 0 || th->evfd < 0 || epoll_ctl(th->ep, EPOLL_CTL_ADD, th->evfd, &ev) != 0) {
            err = errno;
            rc = dxl__sock_code(err);
        } else if (th->scratch == NULL) {
            err = ENOMEM;
            rc = DXL_E_NOMEM;
        }
    }
    if (rc == DXL_OK) {
        dxl__block_signals(&old);
        for (int i = 0; i < threads; i++) {
            int e = pthread_create(&srv->th[i].tid, NULL, dxl__srv_main, &srv->th[i]);
            if (e != 0) {
                err = e;
                rc = e == EAGAIN ? DXL_E_NOMEM : DXL_E_IO;
                break;
            }
            srv->th[i].started = 1;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (rc != DXL_OK) {
        dxl__srv_join(srv);
        dxl__srv_destroy(srv);
        return dxl__fail(rc, err);
    }
    DXL__ADD(dxl__n_tcp_servers, 1);
    *server_p = srv;
    return DXL_OK;
}

/* Connections of srv adopted with `tag` and not yet closed; the caller holds srv->mu. */
static uint64_t dxl__srv_tag_count(dxl_tcp_server_t *srv, uint64_t tag)
{
    uint64_t n = 0;

    for (int i = 0; i < srv->nthreads; i++) {
        pthread_mutex_lock(&srv->th[i].mu);
        for (const dxl__conn_t *c = srv->th[i].conns; c != NULL; c = c->next) {
            n += c->tag == tag;
        }
        pthread_mutex_unlock(&srv->th[i].mu);
    }
    return n;
}

int dxl_tcp_server_adopt(dxl_tcp_server_t *srv, int fd, uint64_t tag)
{
    dxl__srv_thread_t *th = NULL;
    uint64_t best = 0;
    dxl__conn_t *c;
    struct epoll_event ev;
    int flags;
    int err;

    if (srv == NULL || fd < 0) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL || dxl__srv_reserve(NULL, c, DXL__SRV_INIT_PIECES) != DXL_OK) {
        free(c);
        return dxl__fail(DXL_E_NOMEM, ENOMEM);
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
        err = errno;
        dxl__conn_free(NULL, c);
        return dxl__fail(err == EBADF ? DXL_E_INVAL : DXL_E_IO, err);
    }

    /* Under srv->mu from the limits to the count: adoptions are the only way in, so the limits
     * hold exactly (closes only lower the counts). */
    pthread_mutex_lock(&srv->mu);
    if (srv->stopping) {
        pthread_mutex_unlock(&srv->mu);
        (void)fcntl(fd, F_SETFL, flags);
        dxl__conn_free(NULL, c);
        return dxl__fail(DXL_E_INVAL, 0);
    }
    if (__atomic_load_n(&srv->conns_live, __ATOMIC_RELAXED) >= DXL_TCP_MAX_CONNS ||
        dxl__srv_tag_count(srv, tag) >= DXL_TCP_MAX_CONNS_PER_TAG) {
        pthread_mutex_unlock(&srv->mu);
        DXL__ADD(srv->conns_refused, 1);
        (void)fcntl(fd, F_SETFL, flags);
        dxl__conn_free(NULL, c);
        return dxl__fail(DXL_E_LIMIT, 0);
    }
    for (int i = 0; i < srv->nthreads; i++) { /* the least loaded thread */
        uint64_t load;
        pthread_mutex_lock(&srv->th[i].mu);
        load = srv->th[i].nconns;
        pthread_mutex_unlock(&srv->th[i].mu);
        if (th == NULL || load < best) {
            th = &srv->th[i];
            best = load;
        }
    }
    c->th = th;
    c->fd = fd;
    c->tag = tag;
    c->state = DXL__ST_HDR;
    c->interest = EPOLLIN;
    c->io_hint = DXL__SRV_IO_HINT;
    pthread_mutex_lock(&th->mu);
    c->next = th->conns;
    if (th->conns != NULL) {
        th->conns->prev = c;
    }
    th->conns = c;
    th->nconns++;
    pthread_mutex_unlock(&th->mu);
    /* Counted before the thread can see it: its close subtracts what was added here. */
    DXL__ADD(srv->conns_live, 1);
    DXL__ADD(srv->buffer_bytes, c->buf_bytes);

    ev = (struct epoll_event){.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(th->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        err = errno;
        pthread_mutex_lock(&th->mu);
        th->conns = c->next;
        if (c->next != NULL) {
            c->next->prev = NULL;
        }
        th->nconns--;
        pthread_mutex_unlock(&th->mu);
        DXL__SUB(srv->conns_live, 1);
        pthread_mutex_unlock(&srv->mu);
        (void)fcntl(fd, F_SETFL, flags);
        dxl__conn_free(srv, c);
        return dxl__fail(err == EBADF || err == EPERM ? DXL_E_INVAL : DXL_E_IO, err);
    }
    pthread_mutex_unlock(&srv->mu);
    DXL__ADD(srv->conns_adopted, 1);
    return DXL_OK;
}

int dxl_tcp_server_revoke(dxl_tcp_server_t *srv, uint64_t tag, uint64_t *closed_p)
{
    uint64_t marked = 0;

    if (srv == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    pthread_mutex_lock(&srv->mu); /* an adoption is wholly before or wholly after this */
    for (int i = 0; i < srv->nthreads; i++) {
        dxl__srv_thread_t *th = &srv->th[i];
        uint64_t here = 0;
        pthread_mutex_lock(&th->mu);
        for (dxl__conn_t *c = th->conns; c != NULL; c = c->next) {
            if (c->tag == tag && !c->revoked) {
                __atomic_store_n(&c->revoked, 1, __ATOMIC_RELEASE);
                here++;
            }
        }
        pthread_mutex_unlock(&th->mu);
        if (here > 0) {
            dxl__srv_wake(th); /* it closes the idle ones at once */
            marked += here;
        }
    }
    pthread_mutex_unlock(&srv->mu);
    if (closed_p != NULL) {
        *closed_p = marked;
    }
    return DXL_OK;
}

int dxl_tcp_server_fence(dxl_tcp_server_t *srv, int timeout_ms, uint64_t *aborted_p)
{
    int64_t marked = 0;
    uint64_t aborted_before;
    struct timespec deadline;
    int timed_out = 0;

    if (srv == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    pthread_mutex_lock(&srv->fence_mu);
    aborted_before = __atomic_load_n(&srv->requests_aborted, __ATOMIC_RELAXED);
    for (int i = 0; i < srv->nthreads; i++) {
        dxl__srv_thread_t *th = &srv->th[i];
        pthread_mutex_lock(&th->mu);
        for (dxl__conn_t *c = th->conns; c != NULL; c = c->next) {
            if (c->busy) {
                c->fenced = 1;
                marked++;
            }
        }
        pthread_mutex_unlock(&th->mu);
    }

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (timeout_ms >= 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&srv->fmu);
    srv->fpending += marked; /* releases that already happened made it negative: they cancel */
    while (srv->fpending > 0) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&srv->fcv, &srv->fmu);
        } else if (pthread_cond_timedwait(&srv->fcv, &srv->fmu, &deadline) == ETIMEDOUT) {
            timed_out = srv->fpending > 0;
            break;
        }
    }
    pthread_mutex_unlock(&srv->fmu);

    if (timed_out) {
        for (int i = 0; i < srv->nthreads; i++) {
            dxl__srv_thread_t *th = &srv->th[i];
            int any = 0;
            pthread_mutex_lock(&th->mu);
            for (dxl__conn_t *c = th->conns; c != NULL; c = c->next) {
                if (c->fenced) {
                    c->abort = 1;
                    any = 1;
                }
            }
            pthread_mutex_unlock(&th->mu);
            if (any) {
                dxl__srv_wake(th);
            }
        }
        /* Each marked connection is closed by its thread at its next wakeup, promptly: the
         * thread never blocks anywhere but in epoll_wait. */
        pthread_mutex_lock(&srv->fmu);
        while (srv->fpending > 0) {
            pthread_cond_wait(&srv->fcv, &srv->fmu);
        }
        pthread_mutex_unlock(&srv->fmu);
    }
    if (aborted_p != NULL) {
        *aborted_p = __atomic_load_n(&srv->requests_aborted, __ATOMIC_RELAXED) - aborted_before;
    }
    pthread_mutex_unlock(&srv->fence_mu);
    return DXL_OK;
}

void dxl_tcp_server_stats(const dxl_tcp_server_t *srv, dxl_tcp_server_stats_t *out_p)
{
    if (out_p == NULL) {
        return;
    }
    memset(out_p, 0, sizeof(*out_p));
    if (srv == NULL) {
        return;
    }
    out_p->conns_adopted = __atomic_load_n(&srv->conns_adopted, __ATOMIC_RELAXED);
    out_p->conns_live = __atomic_load_n(&srv->conns_live, __ATOMIC_RELAXED);
    out_p->conns_dropped = __atomic_load_n(&srv->conns_dropped, __ATOMIC_RELAXED);
    out_p->requests_served = __atomic_load_n(&srv->requests_served, __ATOMIC_RELAXED);
    out_p->requests_rejected = __atomic_load_n(&srv->requests_rejected, __ATOMIC_RELAXED);
    out_p->bytes_sent = __atomic_load_n(&srv->bytes_sent, __ATOMIC_RELAXED);
    out_p->bytes_received = __atomic_load_n(&srv->bytes_received, __ATOMIC_RELAXED);
    out_p->requests_aborted = __atomic_load_n(&srv->requests_aborted, __ATOMIC_RELAXED);
    out_p->conns_revoked = __atomic_load_n(&srv->conns_revoked, __ATOMIC_RELAXED);
    out_p->conns_refused = __atomic_load_n(&srv->conns_refused, __ATOMIC_RELAXED);
    out_p->buffer_bytes = __atomic_load_n(&srv->buffer_bytes, __ATOMIC_RELAXED);
}

void dxl_tcp_server_stop(dxl_tcp_server_t *srv)
{
    if (srv == NULL) {
        return;
    }
    dxl__srv_join(srv);
    dxl__srv_destroy(srv);
    DXL__SUB(dxl__n_tcp_servers, 1);
}
