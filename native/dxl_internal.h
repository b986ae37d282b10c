/*
 * dxl_internal.h: what the shim's C files share and Python never sees. Include after <stdint.h>
 * and "dxl.h". Internal non-static names start with dxl__.
 */
#ifndef DXL_INTERNAL_H
#define DXL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/* ---- errors ---- */

/* Records err as the calling thread's dxl_last_errno() and returns code (for `return
 * dxl__fail(...)`). */
int dxl__fail(int code, int err);

/* Maps an errno from process_vm_readv/writev, pidfd_open or poll to a DXL_E_* code. */
int dxl__map_errno(int err);

/* ---- counters (atomic; see dxl_counters_t) ---- */

extern uint64_t dxl__n_regions;
extern uint64_t dxl__n_peers;
extern uint64_t dxl__n_inflight;
extern uint64_t dxl__n_bytes_registered;
extern uint64_t dxl__n_split;
extern uint64_t dxl__n_registries;

#define DXL__ADD(var, v) ((void)__atomic_fetch_add(&(var), (uint64_t)(v), __ATOMIC_RELAXED))
#define DXL__SUB(var, v) ((void)__atomic_fetch_sub(&(var), (uint64_t)(v), __ATOMIC_RELAXED))

/* ---- the worker pool (dxl_pool.c) ---- */

typedef void (*dxl__task_func_t)(void *ctx, uint64_t j);

/* Runs fn(ctx, j) once for every task j in [0, ntasks) and returns when all have finished. The
 * calling thread runs task 0, then it and up to `helpers` workers of the process-wide pool (at
 * most DXL_MAX_THREADS - 1 in all, started on first need, all signals blocked) claim the other
 * tasks in order. The caller never waits for a busy or slow-to-wake pool: it runs every task no
 * worker has picked up itself, one after another, and waits only for tasks that workers have
 * started. So tasks must be correct when run one after another on one thread, and a task must
 * never wait for another task, of this call or any other, to start or finish: that one may be
 * queued behind it, to run on the same thread. Writes of the tasks are visible to the caller when
 * this returns. */
void dxl__pool_run(uint64_t ntasks, int helpers, dxl__task_func_t fn, void *ctx);

/* ---- piece lists cut into chunks for threads (dxl_pool.c) ---- */

/* A position in a piece list: byte `off` of piece `piece`. */
typedef struct {
    uint64_t piece;
    uint64_t off;
} dxl__pos_t;

/* Cuts a piece list's bytes [0, total) into k parts at j * total / k (j = 1..k-1), each cut
 * aligned down to `align` inside its piece, walking the pieces once. bounds has k + 1 entries;
 * part j is [bounds[j], bounds[j + 1]). Needs n > 0 and k >= 1. */
void dxl__cut_bytes(dxl__pos_t *bounds, uint64_t k, const uint64_t *len, uint64_t n,
                    uint64_t total, uint64_t align);

typedef struct dxl__slice dxl__slice_t;
typedef void (*dxl__slice_func_t)(dxl__slice_t *slice);

/* One chunk of a piece list, run by one thread: the bytes from `begin` (inclusive) to `end`
 * (exclusive), in piece order; `end` lies in the piece holding the chunk's last byte. fn reports
 * through done/rc/err and polls *stop between syscalls. */
struct dxl__slice {
    dxl__pos_t begin;
    dxl__pos_t end;
    uint64_t done;   /* out: bytes moved */
    int rc;          /* out: DXL_OK or a DXL_E_* code */
    int err;         /* out: errno behind rc, 0 if none */
    int *stop;       /* shared: set (atomically) by a failing slice so the others stop early */
    const void *ctx; /* the operation's arguments */
    dxl__slice_func_t fn;
};

/* Validates the n lengths against the two address arrays (no NULLs when n > 0, no range wraps):
 * DXL_OK and *total_p, or DXL_E_INVAL. */
int dxl__pieces_total(const uint64_t *a, const uint64_t *b, const uint64_t *len, uint64_t n,
                      uint64_t *total_p);

/* Runs fn over the whole piece list (len[0..n), total bytes) on up to max_threads threads (the
 * calling one included) as the split threshold allows, cut into chunks (dxl_pool.c). Returns the
 * first failing chunk's code (in piece order) and records its errno; *done_p (if not NULL) gets
 * the bytes moved. */
int dxl__run_split(const uint64_t *len, uint64_t n, uint64_t total, int max_threads,
                   dxl__slice_func_t fn, const void *ctx, uint64_t *done_p);

/* Advances pos through len[] by `bytes` bytes, skipping exhausted pieces. */
void dxl__pos_advance(dxl__pos_t *pos, const uint64_t *len, uint64_t bytes);

/* 1 if pos has reached end (pos >= end in piece order). */
static inline int dxl__pos_done(const dxl__pos_t *pos, const dxl__pos_t *end)
{
    return pos->piece > end->piece || (pos->piece == end->piece && pos->off >= end->off);
}

/* Bytes of piece i that lie in [pos, end), given pos is inside piece i. */
static inline uint64_t dxl__piece_left(const dxl__pos_t *pos, const dxl__pos_t *end,
                                       const uint64_t *len)
{
    if (pos->piece == end->piece) {
        return end->off > pos->off ? end->off - pos->off : 0;
    }
    return len[pos->piece] - pos->off;
}

static inline int dxl__stopped(const dxl__slice_t *s)
{
    return __atomic_load_n(s->stop, __ATOMIC_RELAXED);
}

#endif /* DXL_INTERNAL_H */
