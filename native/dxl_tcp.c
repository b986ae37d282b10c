/*
 * dxl_tcp.c: the tcp transport. A data server (threads with epoll, serving connections that
 * Python accepted and authenticated) and a client, dxl_tcp_transfer(), that moves a piece list
 * over K streams to one peer's data server. Wire format and API: native/dxl.h.
 *
 * Server safety argument, in one place: a request's table is read completely, then
 * dxl__srv_check() (the only function that turns peer input into permission) validates every
 * entry and the byte total and asks the region registry about every piece; only after DXL_OK are
 * iovecs over those addresses built (dxl__srv_on_table). Nothing else in this file builds an iovec
 * from peer input. Refused WRITE payloads go to a per-thread scratch buffer.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "dxl.h"
#include "dxl_internal.h"

_Static_assert(DXL_TCP_HDR_BYTES == 32, "header layout below is 32 bytes");

/* ---- little-endian encoding ---- */

static void dxl__put16(unsigned char *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof(v));
}

static void dxl__put32(unsigned char *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof(v));
}

static void dxl__put64(unsigned char *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, sizeof(v));
}

static uint16_t dxl__get16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return le16toh(v);
}

static uint32_t dxl__get32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return le32toh(v);
}

static uint64_t dxl__get64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

/* Request header: magic@0 version@4 op@6 id@8 n@16 total@24. */
typedef struct {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint64_t id;
    uint64_t n;
    uint64_t total;
} dxl__req_t;

/* Reply header: magic@0 version@4 op@6 id@8 status@16 detail@20 total@24. */
typedef struct {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint64_t id;
    int32_t status;
    uint32_t detail;
    uint64_t total;
} dxl__rep_t;

static void dxl__req_encode(unsigned char *b, uint16_t op, uint64_t id, uint64_t n, uint64_t total)
{
    dxl__put32(b, DXL_TCP_REQ_MAGIC);
    dxl__put16(b + 4, DXL_TCP_VERSION);
    dxl__put16(b + 6, op);
    dxl__put64(b + 8, id);
    dxl__put64(b + 16, n);
    dxl__put64(b + 24, total);
}

static dxl__req_t dxl__req_decode(const unsigned char *b)
{
    return (dxl__req_t){.magic = dxl__get32(b),
                        .version = dxl__get16(b + 4),
                        .op = dxl__get16(b + 6),
                        .id = dxl__get64(b + 8),
                        .n = dxl__get64(b + 16),
                        .total = dxl__get64(b + 24)};
}

static void dxl__rep_encode(unsigned char *b, uint16_t op, uint64_t id, int32_t status,
                            uint32_t detail, uint64_t total)
{
    dxl__put32(b, DXL_TCP_REP_MAGIC);
    dxl__put16(b + 4, DXL_TCP_VERSION);
    dxl__put16(b + 6, op);
    dxl__put64(b + 8, id);
    dxl__put32(b + 16, (uint32_t)status);
    dxl__put32(b + 20, detail);
    dxl__put64(b + 24, total);
}

static dxl__rep_t dxl__rep_decode(const unsigned char *b)
{
    return (dxl__rep_t){.magic = dxl__get32(b),
                        .version = dxl__get16(b + 4),
                        .op = dxl__get16(b + 6),
                        .id = dxl__get64(b + 8),
                        .status = (int32_t)dxl__get32(b + 16),
                        .detail = dxl__get32(b + 20),
                        .total = dxl__get64(b + 24)};
}

/* ---- small helpers ---- */

static uint64_t dxl__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Maps an errno from a socket call to a DXL_E_* code. */
static int dxl__sock_code(int err)
{
    switch (err) {
    case ECONNRESET:
    case EPIPE:
    case ENOTCONN:
    case ECONNABORTED:
    case ECONNREFUSED:
    case ESHUTDOWN:
    case ETIMEDOUT: /* the kernel gave up on the connection (retransmissions, keepalive) */
    case EHOSTUNREACH:
    case EHOSTDOWN:
    case ENETUNREACH:
    case ENETDOWN:
    case ENETRESET:
        return DXL_E_PEER;
    case EBADF:
    case ENOTSOCK:
    case EINVAL:
        return DXL_E_INVAL;
    case EFAULT:
        return DXL_E_FAULT;
    case ENOMEM:
    case ENOBUFS:
        return DXL_E_NOMEM;
    default:
        return DXL_E_IO;
    }
}

/* Consumes `bytes` from the front of iov[*i ..], leaving *i at the first entry with bytes left. */
static void dxl__iov_advance(struct iovec *iov, size_t cnt, size_t *i, size_t bytes)
{
    while (*i < cnt && bytes >= iov[*i].iov_len) {
        bytes -= iov[*i].iov_len;
        (*i)++;
    }
    if (*i < cnt && bytes > 0) {
        iov[*i].iov_base = (char *)iov[*i].iov_base + bytes;
        iov[*i].iov_len -= bytes;
    }
}

static void dxl__block_signals(sigset_t *old)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, old);
}

/* ================================================================================================
 * data server
 * ============================================================================================== */

#define DXL__SRV_EVENTS 64
/* Syscalls one connection may make per wakeup before the thread turns to the next ready one. */
#define DXL__SRV_BUDGET 16
#define DXL__SRV_SCRATCH (64u << 10)
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
    int busy;          /* th->mu: touching registered memory (READ send, WRITE receive) */
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
    pthread_mutex_t mu; /* adopt vs stop */
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
static int dxl__srv_check(const uint64_t *addr, const uint64_t *len, uint64_t n, uint64_t total,
                          uint64_t *bad_p)
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
    if (dxl_region_check_pieces(addr, len, n, bad_p) != DXL_OK) {
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

/* Marks c busy (touching registered memory) or not. */
static void dxl__srv_set_busy(dxl__conn_t *c, int busy)
{
    int released;

    pthread_mutex_lock(&c->th->mu);
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
}

/* ---- connections ---- */

static void dxl__srv_close(dxl__conn_t *c, int dropped)
{
    dxl__srv_thread_t *th = c->th;
    dxl_tcp_server_t *srv = th->srv;
    int fenced;

    /* Counters first: a peer that sees the close sees them updated. */
    DXL__SUB(srv->conns_live, 1);
    if (dropped) {
        DXL__ADD(srv->conns_dropped, 1);
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

static void dxl__conn_free(dxl__conn_t *c)
{
    free(c->iov);
    free(c->al);
    free(c);
}

/* Room for n pieces; DXL_OK or DXL_E_NOMEM (the old buffers stay). */
static int dxl__srv_reserve(dxl__conn_t *c, uint64_t n)
{
    struct iovec *iov;
    uint64_t *al;

    if (n <= c->cap && c->iov != NULL) {
        return DXL_OK;
    }
    iov = malloc((size_t)(n + 1) * sizeof(*iov));
    al = malloc((size_t)(n > 0 ? 2 * n : 1) * sizeof(*al));
    if (iov == NULL || al == NULL) {
        free(iov);
        free(al);
        return DXL_E_NOMEM;
    }
    free(c->iov);
    free(c->al);
    c->iov = iov;
    c->al = al;
    c->cap = n;
    return DXL_OK;
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
        addr[i] = dxl__get64(raw + 16 * i);
        len[i] = dxl__get64(raw + 16 * i + 8);
    }
    /* Busy before the check, so that dxl_tcp_server_fence either sees this request or runs
     * before the check (and then after the dxl_region_remove it fences, which the check sees). */
    dxl__srv_set_busy(c, 1);
    rc = dxl__srv_check(addr, len, n, c->req.total, &bad);
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
    c->req = dxl__req_decode(c->hdr);
    if (c->req.magic != DXL_TCP_REQ_MAGIC) {
        dxl__srv_malformed(c, DXL_E_PROTO, 0);
    } else if (c->req.version != DXL_TCP_VERSION) {
        dxl__srv_malformed(c, DXL_E_UNSUPPORTED, 0);
    } else if (c->req.op != DXL_TCP_OP_READ && c->req.op != DXL_TCP_OP_WRITE) {
        dxl__srv_malformed(c, DXL_E_PROTO, 0);
    } else if (c->req.n > DXL_TCP_MAX_PIECES) {
        dxl__srv_malformed(c, DXL_E_PROTO, 0);
    } else if (dxl__srv_reserve(c, c->req.n) != DXL_OK) {
        dxl__srv_malformed(c, DXL_E_NOMEM, 0);
    } else {
        c->raw_got = 0;
        c->raw_need = (size_t)c->req.n * 16;
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
    dxl__srv_close(c, !(r == 0 && clean));
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
        return 1;
    case DXL__ST_TABLE:
        r = recv(c->fd, (unsigned char *)(c->iov + 1) + c->raw_got, c->raw_need - c->raw_got, 0);
        if (r <= 0) {
            return dxl__srv_rerr(c, r, 0);
        }
        c->raw_got += (size_t)r;
        if (c->raw_got == c->raw_need) {
            dxl__srv_on_table(c);
        }
        return 1;
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
            dxl__srv_close(c, 1); /* EPIPE, ECONNRESET, or EFAULT (memory unmapped under us) */
            return -1;
        }
        c->io_hint = (size_t)r > c->io_hint ? (size_t)r : c->io_hint;
        dxl__iov_advance(c->iov, c->iov_cnt, &c->iov_pos, (size_t)r);
        if (c->iov_pos == c->iov_cnt) {
            if (c->close_after) {
                dxl__srv_close(c, 1);
                return -1;
            }
            dxl__srv_send_done(c);
        }
        return 1;
    }
    default:
        dxl__srv_close(c, 1);
        return -1;
    }
}

static void dxl__srv_io(dxl__conn_t *c)
{
    for (int i = 0; i < DXL__SRV_BUDGET; i++) {
        int r = dxl__srv_step(c);
        if (r < 0) {
            return;
        }
        if (r == 0) {
            break;
        }
    }
    dxl__srv_interest(c, c->state == DXL__ST_SEND ? EPOLLOUT : EPOLLIN);
}

/* Closes the connections that a timed-out fence marked. */
static void dxl__srv_aborts(dxl__srv_thread_t *th)
{
    for (;;) {
        dxl__conn_t *victim = NULL;
        pthread_mutex_lock(&th->mu);
        for (dxl__conn_t *c = th->conns; c != NULL; c = c->next) {
            if (c->abort) {
                victim = c;
                break;
            }
        }
        pthread_mutex_unlock(&th->mu);
        if (victim == NULL) {
            return;
        }
        DXL__ADD(th->srv->requests_aborted, 1);
        dxl__srv_close(victim, 1);
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
            dxl__conn_free(c);
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
            dxl__conn_free(c);
            DXL__SUB(srv->conns_live, 1);
        }
        while (th->dead != NULL) {
            dxl__conn_t *c = th->dead;
            th->dead = c->dead_next;
            dxl__conn_free(c);
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

int dxl_tcp_server_start(int threads, dxl_tcp_server_t **server_p)
{
    dxl_tcp_server_t *srv;
    pthread_condattr_t ca;
    sigset_t old;
    int rc = DXL_OK;
    int err = 0;

    if (server_p == NULL || threads < 1 || threads > DXL_TCP_MAX_THREADS) {
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

int dxl_tcp_server_adopt(dxl_tcp_server_t *srv, int fd)
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
    if (c == NULL || dxl__srv_reserve(c, DXL__SRV_INIT_PIECES) != DXL_OK) {
        free(c);
        return dxl__fail(DXL_E_NOMEM, ENOMEM);
    }
    flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
        err = errno;
        dxl__conn_free(c);
        return dxl__fail(err == EBADF ? DXL_E_INVAL : DXL_E_IO, err);
    }

    pthread_mutex_lock(&srv->mu);
    if (srv->stopping) {
        pthread_mutex_unlock(&srv->mu);
        (void)fcntl(fd, F_SETFL, flags);
        dxl__conn_free(c);
        return dxl__fail(DXL_E_INVAL, 0);
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
        pthread_mutex_unlock(&srv->mu);
        (void)fcntl(fd, F_SETFL, flags);
        dxl__conn_free(c);
        return dxl__fail(err == EBADF || err == EPERM ? DXL_E_INVAL : DXL_E_IO, err);
    }
    pthread_mutex_unlock(&srv->mu);
    DXL__ADD(srv->conns_adopted, 1);
    DXL__ADD(srv->conns_live, 1);
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

/* ================================================================================================
 * client
 * ============================================================================================== */

/* Fewest bytes worth one more stream. Loopback on a 2-core VM (benchmarks/tcp_vs_raw_socket.py)
 * gains nothing from more streams; across a network several flows help: from 4 MiB a call uses
 * two. */
#define DXL__STREAM_MIN_DEFAULT (4u << 20)
/* How often a stream waiting in poll looks whether another stream failed. */
#define DXL__POLL_SLICE_MS 50
/* Internal: this stream stopped because another one failed. */
#define DXL__ABORTED 1
#define DXL__CUT_ALIGN 4096u
#define DXL__STREAM_STACK (256u << 10)

static uint64_t dxl__stream_min = DXL__STREAM_MIN_DEFAULT;
static uint64_t dxl__next_request_id = 1;

uint64_t dxl_tcp_stream_threshold(uint64_t min_bytes_per_stream)
{
    if (min_bytes_per_stream == 0) {
        return __atomic_load_n(&dxl__stream_min, __ATOMIC_RELAXED);
    }
    return __atomic_exchange_n(&dxl__stream_min, min_bytes_per_stream, __ATOMIC_RELAXED);
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

    if (rep.magic != DXL_TCP_REP_MAGIC || rep.version != DXL_TCP_VERSION || rep.op != op ||
        rep.id != id) {
        return DXL_E_PROTO;
    }
    if (rep.status != DXL_OK) {
        if (rep.status > 0 || rep.total != 0) {
            return DXL_E_PROTO;
        }
        s->remote_status = rep.status;
        s->remote_detail = rep.detail;
        return DXL_E_REMOTE;
    }
    return rep.total == bytes ? DXL_OK : DXL_E_PROTO;
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
    table = malloc((size_t)cap * 16);
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
            dxl__put64(table + 16 * m, s->remote[p.piece] + p.off);
            dxl__put64(table + 16 * m + 8, chunk);
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
        iov[1] = (struct iovec){.iov_base = table, .iov_len = (size_t)m * 16};

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

static void *dxl__stream_main(void *arg)
{
    dxl__stream_run(arg);
    return NULL;
}

int dxl_tcp_transfer(const int *fds, int nfds, int write, const uint64_t *local,
                     const uint64_t *remote, const uint64_t *len, uint64_t n, int timeout_ms,
                     dxl_tcp_result_t *result_p)
{
    dxl__stream_t st[DXL_TCP_MAX_STREAMS];
    dxl__pos_t bounds[DXL_TCP_MAX_STREAMS + 1];
    pthread_t tids[DXL_TCP_MAX_STREAMS];
    int started[DXL_TCP_MAX_STREAMS];
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
        started[j] = 0;
    }
    dxl__cut_bytes(bounds, k, len, n, total, DXL__CUT_ALIGN);
    for (uint64_t j = 0; j < k; j++) {
        st[j].begin = bounds[j];
        st[j].end = bounds[j + 1];
    }

    DXL__ADD(dxl__n_inflight, 1);
    if (k > 1) {
        pthread_attr_t attr;
        sigset_t old;
        int have_attr = pthread_attr_init(&attr) == 0;
        if (have_attr) {
            (void)pthread_attr_setstacksize(&attr, DXL__STREAM_STACK);
        }
        dxl__block_signals(&old);
        for (uint64_t j = 1; j < k; j++) {
            started[j] = pthread_create(&tids[j], have_attr ? &attr : NULL, dxl__stream_main,
                                        &st[j]) == 0;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (have_attr) {
            pthread_attr_destroy(&attr);
        }
    }
    dxl__stream_run(&st[0]);
    for (uint64_t j = 1; j < k; j++) {
        if (!started[j]) {
            dxl__stream_run(&st[j]); /* no thread: run it here, after the others */
        }
    }
    for (uint64_t j = 1; j < k; j++) {
        if (started[j]) {
            pthread_join(tids[j], NULL);
        }
    }
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
