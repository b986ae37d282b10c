/*
 * dxl_cma.c: peers (pid + pidfd) and cross-memory attach transfers, process_vm_readv/writev.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dxl.h"
#include "dxl_internal.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434 /* the same number on every architecture's generic table */
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438 /* likewise */
#endif

/* Longest single iovec entry we hand the kernel; longer pieces take several entries. Keeps every
 * entry far below SSIZE_MAX (the kernel also caps one call at about 2 GiB and returns short). */
#define DXL__IOV_CHUNK (1ull << 30)

struct dxl_peer {
    pid_t pid;
    int pidfd; /* -1 where the kernel (or a seccomp filter) refuses pidfd_open */
};

/* ---- peers ---- */

int dxl_peer_open(int pid, dxl_peer_t **peer_p)
{
    dxl_peer_t *peer;
    int fd;

    if (pid <= 0 || peer_p == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    fd = (int)syscall(SYS_pidfd_open, (pid_t)pid, 0u);
    if (fd < 0) {
        int err = errno;
        /* ENOSYS: kernel < 5.3. EPERM: seccomp profiles that predate the syscall answer so. Fall
         * back to the bare pid and its reuse risk, documented in dxl.h. */
        if (err != ENOSYS && err != EPERM) {
            return dxl__fail(dxl__map_errno(err), err);
        }
        if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) {
            return dxl__fail(DXL_E_SRCH, ESRCH);
        }
        fd = -1;
    }
    peer = malloc(sizeof(*peer));
    if (peer == NULL) {
        if (fd >= 0) {
            close(fd);
        }
        return dxl__fail(DXL_E_NOMEM, ENOMEM);
    }
    peer->pid = (pid_t)pid;
    peer->pidfd = fd; /* pidfd_open sets O_CLOEXEC itself */
    DXL__ADD(dxl__n_peers, 1);
    *peer_p = peer;
    return DXL_OK;
}

int dxl_peer_alive(const dxl_peer_t *peer)
{
    if (peer == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    if (peer->pidfd >= 0) {
        /* A pidfd polls readable once its process has exited (zombies included). */
        struct pollfd pfd = {.fd = peer->pidfd, .events = POLLIN, .revents = 0};
        int r;
        do {
            r = poll(&pfd, 1, 0);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            return dxl__fail(dxl__map_errno(errno), errno);
        }
        return r == 0 ? 1 : 0;
    }
    if (kill(peer->pid, 0) == 0 || errno == EPERM) {
        return 1;
    }
    return 0;
}

int dxl_peer_pid(const dxl_peer_t *peer)
{
    return peer == NULL ? dxl__fail(DXL_E_INVAL, 0) : (int)peer->pid;
}

int dxl_peer_has_pidfd(const dxl_peer_t *peer)
{
    return peer == NULL ? dxl__fail(DXL_E_INVAL, 0) : peer->pidfd >= 0;
}

int dxl_peer_getfd(const dxl_peer_t *peer, int fd, int *fd_p)
{
    int got;

    if (peer == NULL || fd < 0 || fd_p == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    /* Only through the pidfd: a bare pid may already name another process. */
    if (peer->pidfd < 0) {
        return dxl__fail(DXL_E_UNSUPPORTED, 0);
    }
    /* The peer's own open file description, so its access mode is the peer's. The kernel allows
     * it under the same ptrace check (PTRACE_MODE_ATTACH_REALCREDS) as process_vm_readv. The new
     * descriptor is close-on-exec. */
    got = (int)syscall(SYS_pidfd_getfd, peer->pidfd, fd, 0u);
    if (got < 0) {
        return dxl__fail(dxl__map_errno(errno), errno);
    }
    *fd_p = got;
    return DXL_OK;
}

void dxl_peer_close(dxl_peer_t *peer)
{
    if (peer == NULL) {
        return;
    }
    if (peer->pidfd >= 0) {
        close(peer->pidfd);
    }
    free(peer);
    DXL__SUB(dxl__n_peers, 1);
}

/* ---- transfers ---- */

typedef struct {
    pid_t pid;
    int write;
    const uint64_t *local;
    const uint64_t *remote;
    const uint64_t *len;
    const uint64_t *win; /* nwin x {remote_start, remote_end, local_start}, sorted, disjoint */
    uint64_t nwin;
} dxl__cma_args_t;

/* The window holding all of [r, r + n) in the peer, or NULL. Checks *hint (the last hit) first:
 * consecutive pieces almost always lie in the same tensor. */
static const uint64_t *dxl__window(const dxl__cma_args_t *a, uint64_t r, uint64_t n,
                                   uint64_t *hint)
{
    const uint64_t *w = a->win + 3 * *hint;
    uint64_t lo = 0;
    uint64_t hi = a->nwin;

    if (r >= w[0] && r - w[0] + n <= w[1] - w[0]) {
        return w;
    }
    while (lo < hi) { /* the last window starting at or below r */
        uint64_t mid = lo + (hi - lo) / 2;
        if (a->win[3 * mid] <= r) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo == 0) {
        return NULL;
    }
    w = a->win + 3 * (lo - 1);
    if (r - w[0] + n > w[1] - w[0]) {
        return NULL;
    }
    *hint = lo - 1;
    return w;
}

/* Copies the part of the piece at pos that lies in [pos, end) through window w, mapped here. */
static uint64_t dxl__window_copy(const dxl__cma_args_t *a, const uint64_t *w, const dxl__pos_t *pos,
                                 uint64_t left)
{
    char *local = (char *)(uintptr_t)(a->local[pos->piece] + pos->off);
    char *mapped = (char *)(uintptr_t)(w[2] + (a->remote[pos->piece] + pos->off - w[0]));

    if (a->write) {
        memcpy(mapped, local, (size_t)left);
    } else {
        memcpy(local, mapped, (size_t)left);
    }
    return left;
}

/* Moves one slice: fill up to DXL_IOV_MAX entries from the current position, one syscall, advance
 * by what the kernel reports, repeat. Local and remote entries have equal lengths, so a short
 * return leaves both sides at the same byte. */
static void dxl__cma_slice(dxl__slice_t *s)
{
    const dxl__cma_args_t *a = s->ctx;
    struct iovec liov[DXL_IOV_MAX];
    struct iovec riov[DXL_IOV_MAX];
    dxl__pos_t pos = s->begin;
    uint64_t hint = 0;

    while (!dxl__pos_done(&pos, &s->end)) {
        dxl__pos_t p = pos;
        unsigned long cnt = 0;
        ssize_t got;

        if (dxl__stopped(s)) {
            return;
        }
        if (a->nwin > 0) { /* pieces the peer shares with us are a plain memcpy */
            uint64_t left = dxl__piece_left(&pos, &s->end, a->len);
            const uint64_t *w =
                left > 0 ? dxl__window(a, a->remote[pos.piece] + pos.off, left, &hint) : NULL;
            if (w != NULL) {
                s->done += dxl__window_copy(a, w, &pos, left);
            }
            if (left == 0 || w != NULL) {
                pos.piece++;
                pos.off = 0;
                continue;
            }
        }
        while (cnt < DXL_IOV_MAX && !dxl__pos_done(&p, &s->end)) {
            uint64_t left = dxl__piece_left(&p, &s->end, a->len);
            uint64_t chunk = left < DXL__IOV_CHUNK ? left : DXL__IOV_CHUNK;
            if (left == 0) {
                p.piece++;
                p.off = 0;
                continue;
            }
            if (a->nwin > 0 && cnt > 0 && p.off == 0 &&
                dxl__window(a, a->remote[p.piece], left, &hint) != NULL) {
                break; /* the next piece is shared: copy it on the next turn */
            }
            liov[cnt].iov_base = (void *)(uintptr_t)(a->local[p.piece] + p.off);
            liov[cnt].iov_len = (size_t)chunk;
            riov[cnt].iov_base = (void *)(uintptr_t)(a->remote[p.piece] + p.off);
            riov[cnt].iov_len = (size_t)chunk;
            cnt++;
            p.off += chunk;
        }
        if (cnt == 0) {
            return;
        }
        if (a->write) {
            got = process_vm_writev(a->pid, liov, cnt, riov, cnt, 0);
        } else {
            got = process_vm_readv(a->pid, liov, cnt, riov, cnt, 0);
        }
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got <= 0) {
            s->err = got < 0 ? errno : 0;
            s->rc = got < 0 ? dxl__map_errno(s->err) : DXL_E_SHORT;
            __atomic_store_n(s->stop, 1, __ATOMIC_RELAXED);
            return;
        }
        s->done += (uint64_t)got;
        dxl__pos_advance(&pos, a->len, (uint64_t)got);
    }
}

int dxl_cma_transfer(const dxl_peer_t *peer, int write, const uint64_t *local,
                     const uint64_t *remote, const uint64_t *len, uint64_t n, int max_threads,
                     uint64_t *bytes_done_p)
{
    return dxl_cma_transfer_mapped(peer, write, local, remote, len, n, max_threads, NULL, 0,
                                   bytes_done_p);
}

/* 1 if the windows are sorted by remote start, disjoint, non-empty and do not wrap. */
static int dxl__windows_ok(const uint64_t *win, uint64_t nwin)
{
    for (uint64_t i = 0; i < nwin; i++) {
        const uint64_t *w = win + 3 * i;
        if (w[1] <= w[0] || w[2] + (w[1] - w[0]) < w[2] || (i > 0 && w[0] < w[-2])) {
            return 0;
        }
    }
    return 1;
}

int dxl_cma_transfer_mapped(const dxl_peer_t *peer, int write, const uint64_t *local,
                            const uint64_t *remote, const uint64_t *len, uint64_t n,
                            int max_threads, const uint64_t *windows, uint64_t nwin,
                            uint64_t *bytes_done_p)
{
    dxl__cma_args_t args;
    uint64_t total = 0;
    uint64_t done = 0;
    int alive;
    int rc;

    if (bytes_done_p != NULL) {
        *bytes_done_p = 0;
    }
    if (peer == NULL || (write != 0 && write != 1) || (nwin > 0 && windows == NULL) ||
        (nwin > 0 && !dxl__windows_ok(windows, nwin))) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    rc = dxl__pieces_total(local, remote, len, n, &total);
    if (rc != DXL_OK || total == 0) {
        return rc;
    }

    DXL__ADD(dxl__n_inflight, 1);
    alive = dxl_peer_alive(peer);
    if (alive <= 0) {
        rc = alive < 0 ? alive : dxl__fail(DXL_E_SRCH, ESRCH);
        goto out;
    }
    args = (dxl__cma_args_t){
        .pid = peer->pid,
        .write = write,
        .local = local,
        .remote = remote,
        .len = len,
        .win = windows,
        .nwin = nwin};
    rc = dxl__run_split(len, n, total, max_threads, dxl__cma_slice, &args, &done);
    /* If the peer is gone now, its pid may have been reused while we copied: whatever the copy
     * said, those bytes cannot be trusted. (While it is alive its pid cannot be reused.) */
    if (dxl_peer_alive(peer) == 0) {
        rc = dxl__fail(DXL_E_SRCH, ESRCH);
    }
out:
    DXL__SUB(dxl__n_inflight, 1);
    if (bytes_done_p != NULL) {
        *bytes_done_p = done;
    }
    return rc;
}

int dxl_cma_self_test(void)
{
    uint64_t src = 0x0123456789abcdefull;
    uint64_t dst = 0;
    struct iovec liov = {.iov_base = &dst, .iov_len = sizeof(dst)};
    struct iovec riov = {.iov_base = &src, .iov_len = sizeof(src)};
    ssize_t got = process_vm_readv(getpid(), &liov, 1, &riov, 1, 0);

    if (got < 0) {
        return dxl__fail(dxl__map_errno(errno), errno);
    }
    if (got != (ssize_t)sizeof(dst) || dst != src) {
        return dxl__fail(DXL_E_SHORT, 0);
    }
    return DXL_OK;
}

/* dxl_check_readable without CMA: the kernel reads one byte through write() into a pipe. */
static int dxl__check_readable_pipe(const uint64_t *addr, uint64_t n)
{
    int fds[2];
    int rc = DXL_OK;

    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) {
        return dxl__fail(dxl__map_errno(errno), errno);
    }
    for (uint64_t i = 0; i < n && rc == DXL_OK; i++) {
        char c;
        ssize_t w;
        do {
            w = write(fds[1], (const void *)(uintptr_t)addr[i], 1);
        } while (w < 0 && errno == EINTR);
        if (w != 1) {
            int err = w < 0 ? errno : 0;
            rc = dxl__fail(err == EFAULT ? DXL_E_FAULT : dxl__map_errno(err), err);
        } else if (read(fds[0], &c, 1) != 1) {
            rc = dxl__fail(DXL_E_IO, errno);
        }
    }
    close(fds[0]);
    close(fds[1]);
    return rc;
}

int dxl_check_readable(const uint64_t *addr, uint64_t n)
{
    struct iovec liov[DXL_IOV_MAX];
    struct iovec riov[DXL_IOV_MAX];
    char sink;
    pid_t self = getpid();

    if (n > 0 && addr == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    for (uint64_t i = 0; i < n;) {
        unsigned long cnt = 0;
        ssize_t got;
        for (; cnt < DXL_IOV_MAX && i + cnt < n; cnt++) {
            liov[cnt].iov_base = &sink; /* every byte lands on the same scratch byte */
            liov[cnt].iov_len = 1;
            riov[cnt].iov_base = (void *)(uintptr_t)addr[i + cnt];
            riov[cnt].iov_len = 1;
        }
        got = process_vm_readv(self, liov, cnt, riov, cnt, 0);
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got < 0 && (errno == ENOSYS || errno == EPERM)) {
            return dxl__check_readable_pipe(addr + i, n - i);
        }
        if (got < 0) {
            return dxl__fail(dxl__map_errno(errno), errno);
        }
        if ((uint64_t)got < cnt) {
            return dxl__fail(DXL_E_FAULT, EFAULT); /* addr[i + got] is not readable */
        }
        i += cnt;
    }
    return DXL_OK;
}
