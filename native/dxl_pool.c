/*
 * dxl_pool.c: the small persistent worker pool of the shim, and cutting a piece list into
 * per-thread byte ranges that run on it.
 *
 * The pool runs jobs of independent tasks (dxl__pool_run). A caller posts its job, wakes up to
 * the number of workers it may use and runs task 0 itself, then claims the other tasks in order
 * through an atomic counter; a worker that wakes up joins and claims tasks the same way. So a call
 * never waits on a busy or slow-to-wake pool: at worst the caller runs every task itself, as
 * without threads. Once all tasks are claimed the job is withdrawn and the caller waits only for
 * the workers still running one. Workers are started on first need (at most DXL_MAX_THREADS - 1,
 * all signals blocked) and then sleep on a condition variable; a forked child starts with an empty
 * pool. Users: dxl__run_split (cma and local copies: S >= k chunks of roughly equal size for k
 * threads, so that chunks balance the load between threads that start late) and the tcp client
 * (one task per stream).
 */
#include <pthread.h>
#include <signal.h>
#include <stdint.h>

#include "dxl.h"
#include "dxl_internal.h"

/* Fewest bytes worth one more thread. benchmarks/native_cma_threads.py's size sweep (2-core VM,
 * 16 KiB pieces) has a forced 2-way pull break even at 512 KiB requests and win 1.25x at 1 MiB,
 * 1.5x from 4 MiB: so requests from 1 MiB up use two threads. */
#define DXL__SPLIT_DEFAULT (512u << 10)
/* Chunks: at least this many bytes each, at most DXL__CHUNKS_PER_THREAD per thread. More chunks
 * balance better when a worker starts late; fewer share syscalls better. */
#define DXL__CHUNK_MIN (128u << 10)
#define DXL__CHUNKS_PER_THREAD 4
#define DXL__MAX_CHUNKS (DXL__CHUNKS_PER_THREAD * DXL_MAX_THREADS)
/* Slice boundaries inside a piece are rounded down to this, so threads copy whole pages. */
#define DXL__SPLIT_ALIGN 4096u
#define DXL__WORKER_STACK (128u << 10)
#define DXL__POOL_MAX (DXL_MAX_THREADS - 1)

static uint64_t dxl__split_min = DXL__SPLIT_DEFAULT;

uint64_t dxl_split_threshold(uint64_t min_bytes_per_thread)
{
    if (min_bytes_per_thread == 0) {
        return __atomic_load_n(&dxl__split_min, __ATOMIC_RELAXED);
    }
    return __atomic_exchange_n(&dxl__split_min, min_bytes_per_thread, __ATOMIC_RELAXED);
}

/* ---- piece lists ---- */

int dxl__pieces_total(const uint64_t *a, const uint64_t *b, const uint64_t *len, uint64_t n,
                      uint64_t *total_p)
{
    uint64_t total = 0;

    if (n > 0 && (a == NULL || b == NULL || len == NULL)) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t l = len[i];
        if (l == 0) {
            continue;
        }
        if (a[i] > UINT64_MAX - l || b[i] > UINT64_MAX - l || total > UINT64_MAX - l) {
            return dxl__fail(DXL_E_INVAL, 0);
        }
        total += l;
    }
    *total_p = total;
    return DXL_OK;
}

void dxl__pos_advance(dxl__pos_t *pos, const uint64_t *len, uint64_t bytes)
{
    while (bytes > 0) {
        uint64_t left = len[pos->piece] - pos->off;
        if (bytes < left) {
            pos->off += bytes;
            return;
        }
        bytes -= left;
        pos->piece++;
        pos->off = 0;
    }
}

void dxl__cut_bytes(dxl__pos_t *bounds, uint64_t k, const uint64_t *len, uint64_t n,
                    uint64_t total, uint64_t align)
{
    uint64_t piece = 0;
    uint64_t before = 0; /* bytes in pieces [0, piece) */

    bounds[0] = (dxl__pos_t){0, 0};
    for (uint64_t j = 0; j < k; j++) {
        dxl__pos_t end = {n - 1, len[n - 1]};
        if (j + 1 < k) {
            uint64_t cut = (uint64_t)(((unsigned __int128)total * (j + 1)) / k);
            while (before + len[piece] < cut) {
                before += len[piece];
                piece++;
            }
            end.piece = piece;
            end.off = cut - before;
            end.off -= end.off % align;
            if (end.piece == bounds[j].piece && end.off < bounds[j].off) {
                end.off = bounds[j].off;
            }
        }
        bounds[j + 1] = end;
    }
}

/* ---- the pool ---- */

/* One dxl__pool_run call, on its caller's stack. */
typedef struct dxl__job {
    struct dxl__job *next;
    struct dxl__job *prev;
    dxl__task_func_t fn;
    void *ctx;
    uint64_t ntasks;
    uint64_t claim;  /* next task to run (atomic) */
    int helpers;     /* workers on this job now (pool lock) */
    int max_helpers; /* how many may join */
    int queued;      /* still offered to workers (pool lock) */
} dxl__job_t;

static pthread_mutex_t dxl__pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t dxl__pool_work = PTHREAD_COND_INITIALIZER; /* a job is queued */
static pthread_cond_t dxl__pool_left = PTHREAD_COND_INITIALIZER; /* a worker left a job */
static pthread_once_t dxl__pool_once = PTHREAD_ONCE_INIT;
static dxl__job_t *dxl__q_head;
static dxl__job_t *dxl__q_tail;
static int dxl__pool_size;

/* A forked child has only the forking thread: forget the parent's workers and queue. */
static void dxl__pool_atfork_child(void)
{
    pthread_mutex_init(&dxl__pool_mu, NULL);
    pthread_cond_init(&dxl__pool_work, NULL);
    pthread_cond_init(&dxl__pool_left, NULL);
    dxl__q_head = NULL;
    dxl__q_tail = NULL;
    dxl__pool_size = 0;
}

static void dxl__pool_init(void)
{
    (void)pthread_atfork(NULL, NULL, dxl__pool_atfork_child);
}

/* Queue operations; the caller holds dxl__pool_mu. */
static void dxl__q_push(dxl__job_t *job)
{
    job->next = NULL;
    job->prev = dxl__q_tail;
    if (dxl__q_tail != NULL) {
        dxl__q_tail->next = job;
    } else {
        dxl__q_head = job;
    }
    dxl__q_tail = job;
    job->queued = 1;
}

static void dxl__q_unlink(dxl__job_t *job)
{
    if (!job->queued) {
        return;
    }
    if (job->prev != NULL) {
        job->prev->next = job->next;
    } else {
        dxl__q_head = job->next;
    }
    if (job->next != NULL) {
        job->next->prev = job->prev;
    } else {
        dxl__q_tail = job->prev;
    }
    job->queued = 0;
}

/* Runs unclaimed tasks of the job until none is left. */
static void dxl__job_work(dxl__job_t *job)
{
    for (;;) {
        uint64_t j = __atomic_fetch_add(&job->claim, 1, __ATOMIC_RELAXED);
        if (j >= job->ntasks) {
            return;
        }
        job->fn(job->ctx, j);
    }
}

static void *dxl__pool_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&dxl__pool_mu);
    for (;;) {
        dxl__job_t *job;
        while (dxl__q_head == NULL) {
            pthread_cond_wait(&dxl__pool_work, &dxl__pool_mu);
        }
        job = dxl__q_head;
        if (++job->helpers >= job->max_helpers) {
            dxl__q_unlink(job); /* fully staffed */
        }
        pthread_mutex_unlock(&dxl__pool_mu);
        dxl__job_work(job);
        pthread_mutex_lock(&dxl__pool_mu);
        /* Nothing is left to claim: let no one else join. Left queued, it would send idle workers
         * round this loop until its caller finishes its last task, which may take long. */
        dxl__q_unlink(job);
        /* The last touch of job: once helpers is 0 and it is unqueued its caller returns. */
        if (--job->helpers == 0) {
            pthread_cond_broadcast(&dxl__pool_left);
        }
    }
    return NULL;
}

/* Starts workers until there are `want` (fewer if the system refuses); holds dxl__pool_mu. */
static void dxl__pool_grow(int want)
{
    pthread_attr_t attr;
    sigset_t all;
    sigset_t old;

    if (dxl__pool_size >= want || pthread_attr_init(&attr) != 0) {
        return;
    }
    (void)pthread_attr_setstacksize(&attr, DXL__WORKER_STACK);
    (void)pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old); /* workers inherit it: signals go to other threads */
    while (dxl__pool_size < want) {
        pthread_t tid;
        if (pthread_create(&tid, &attr, dxl__pool_main, NULL) != 0) {
            break;
        }
        dxl__pool_size++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
}

void dxl__pool_run(uint64_t ntasks, int helpers, dxl__task_func_t fn, void *ctx)
{
    dxl__job_t job = {.fn = fn, .ctx = ctx, .ntasks = ntasks, .claim = 1};

    if (ntasks == 0) {
        return;
    }
    if (helpers > DXL__POOL_MAX) {
        helpers = DXL__POOL_MAX;
    }
    if ((uint64_t)helpers > ntasks - 1) {
        helpers = (int)(ntasks - 1);
    }
    if (helpers < 1) {
        for (uint64_t j = 0; j < ntasks; j++) {
            fn(ctx, j);
        }
        return;
    }
    job.max_helpers = helpers;

    pthread_once(&dxl__pool_once, dxl__pool_init);
    pthread_mutex_lock(&dxl__pool_mu);
    dxl__pool_grow(helpers);
    if (dxl__pool_size > 0) {
        dxl__q_push(&job);
        for (int i = 0; i < helpers && i < dxl__pool_size; i++) {
            pthread_cond_signal(&dxl__pool_work);
        }
    }
    pthread_mutex_unlock(&dxl__pool_mu);

    fn(ctx, 0); /* claim starts at 1: task 0 is the caller's */
    dxl__job_work(&job);

    pthread_mutex_lock(&dxl__pool_mu);
    dxl__q_unlink(&job); /* nothing left to claim: let no one else join */
    while (job.helpers > 0) {
        pthread_cond_wait(&dxl__pool_left, &dxl__pool_mu);
    }
    pthread_mutex_unlock(&dxl__pool_mu);
}

static void dxl__slice_task(void *ctx, uint64_t j)
{
    dxl__slice_t *slices = ctx;

    slices[j].fn(&slices[j]);
}

int dxl__run_split(const uint64_t *len, uint64_t n, uint64_t total, int max_threads,
                   dxl__slice_func_t fn, const void *ctx, uint64_t *done_p)
{
    dxl__slice_t slices[DXL__MAX_CHUNKS];
    dxl__pos_t bounds[DXL__MAX_CHUNKS + 1];
    uint64_t min_bytes = __atomic_load_n(&dxl__split_min, __ATOMIC_RELAXED);
    uint64_t k = 1;
    uint64_t nslices = 1;
    uint64_t done = 0;
    int stop = 0;
    int rc = DXL_OK;
    int err = 0;

    if (n == 0) {
        return DXL_OK;
    }
    if (max_threads > DXL_MAX_THREADS) {
        max_threads = DXL_MAX_THREADS;
    }
    if (max_threads > 1) {
        k = total / min_bytes; /* min_bytes is never 0 */
        k = k > (uint64_t)max_threads ? (uint64_t)max_threads : k;
        k = k < 1 ? 1 : k;
    }
    if (k > 1) {
        nslices = total / DXL__CHUNK_MIN;
        nslices = nslices > DXL__CHUNKS_PER_THREAD * k ? DXL__CHUNKS_PER_THREAD * k : nslices;
        nslices = nslices < k ? k : nslices;
    }
    for (uint64_t j = 0; j < nslices; j++) {
        slices[j] = (dxl__slice_t){.stop = &stop, .ctx = ctx, .fn = fn};
    }
    dxl__cut_bytes(bounds, nslices, len, n, total, DXL__SPLIT_ALIGN);
    for (uint64_t j = 0; j < nslices; j++) {
        slices[j].begin = bounds[j];
        slices[j].end = bounds[j + 1];
    }

    if (k > 1) {
        DXL__ADD(dxl__n_split, 1);
        dxl__pool_run(nslices, (int)k - 1, dxl__slice_task, slices);
    } else {
        fn(&slices[0]);
    }

    for (uint64_t j = 0; j < nslices; j++) {
        done += slices[j].done;
        if (rc == DXL_OK && slices[j].rc != DXL_OK) {
            rc = slices[j].rc;
            err = slices[j].err;
        }
    }
    if (done_p != NULL) {
        *done_p = done;
    }
    return rc == DXL_OK ? DXL_OK : dxl__fail(rc, err);
}
