/*
 * dxl_registry.c: registries of local regions, for bounds checks. Each is an object of its own
 * (an engine owns one, and its data server checks against that one only); the regions_live and
 * bytes_registered counters sum over all of them.
 *
 * Regions sit in an array sorted by base, with a running maximum of their ends (max_end[i] is the
 * largest end among regions 0..i). A check finds the last region whose base is <= addr by binary
 * search, then walks down while max_end still reaches the piece's end: with no overlap that is one
 * step. Adds and removes rebuild the running maximum (the table is small; checks dominate). A
 * rwlock per registry lets checks from many threads run together.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dxl.h"
#include "dxl_internal.h"

typedef struct {
    uint64_t id;
    uint64_t base;
    uint64_t end; /* base + len, never wraps */
    uint64_t max_end;
} dxl__region_t;

struct dxl_registry {
    pthread_rwlock_t lock;
    dxl__region_t *regs; /* lock */
    uint64_t nregs;      /* lock */
    uint64_t capregs;    /* lock */
    uint64_t next_id;    /* lock */
};

static void dxl__rebuild_max(dxl_registry_t *r, uint64_t from)
{
    uint64_t m = from > 0 ? r->regs[from - 1].max_end : 0;
    for (uint64_t i = from; i < r->nregs; i++) {
        if (r->regs[i].end > m) {
            m = r->regs[i].end;
        }
        r->regs[i].max_end = m;
    }
}

/* Number of regions with base <= addr (so the candidate is that count minus one). */
static uint64_t dxl__upper(const dxl_registry_t *r, uint64_t addr)
{
    uint64_t lo = 0;
    uint64_t hi = r->nregs;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (r->regs[mid].base <= addr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

int dxl_registry_new(dxl_registry_t **registry_p)
{
    dxl_registry_t *r;
    int e;

    if (registry_p == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    r = calloc(1, sizeof(*r));
    if (r == NULL) {
        return dxl__fail(DXL_E_NOMEM, ENOMEM);
    }
    e = pthread_rwlock_init(&r->lock, NULL);
    if (e != 0) {
        free(r);
        return dxl__fail(e == ENOMEM || e == EAGAIN ? DXL_E_NOMEM : DXL_E_IO, e);
    }
    r->next_id = 1;
    DXL__ADD(dxl__n_registries, 1);
    *registry_p = r;
    return DXL_OK;
}

void dxl_registry_free(dxl_registry_t *r)
{
    uint64_t bytes = 0;

    if (r == NULL) {
        return;
    }
    for (uint64_t i = 0; i < r->nregs; i++) {
        bytes += r->regs[i].end - r->regs[i].base;
    }
    DXL__SUB(dxl__n_regions, r->nregs);
    DXL__SUB(dxl__n_bytes_registered, bytes);
    free(r->regs);
    pthread_rwlock_destroy(&r->lock);
    free(r);
    DXL__SUB(dxl__n_registries, 1);
}

int dxl_region_add(dxl_registry_t *r, uint64_t base, uint64_t len, uint64_t *id_p)
{
    uint64_t at;

    if (r == NULL || id_p == NULL || len == 0 || base > UINT64_MAX - len) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    pthread_rwlock_wrlock(&r->lock);
    if (r->nregs == r->capregs) {
        uint64_t cap = r->capregs ? 2 * r->capregs : 16;
        dxl__region_t *grown = realloc(r->regs, cap * sizeof(*grown));
        if (grown == NULL) {
            pthread_rwlock_unlock(&r->lock);
            return dxl__fail(DXL_E_NOMEM, ENOMEM);
        }
        r->regs = grown;
        r->capregs = cap;
    }
    at = dxl__upper(r, base);
    memmove(&r->regs[at + 1], &r->regs[at], (r->nregs - at) * sizeof(*r->regs));
    r->regs[at] = (dxl__region_t){.id = r->next_id++, .base = base, .end = base + len};
    r->nregs++;
    dxl__rebuild_max(r, at);
    *id_p = r->regs[at].id;
    pthread_rwlock_unlock(&r->lock);

    DXL__ADD(dxl__n_regions, 1);
    DXL__ADD(dxl__n_bytes_registered, len);
    return DXL_OK;
}

int dxl_region_remove(dxl_registry_t *r, uint64_t id)
{
    uint64_t len = 0;
    int found = 0;

    if (r == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    pthread_rwlock_wrlock(&r->lock);
    for (uint64_t i = 0; i < r->nregs; i++) {
        if (r->regs[i].id == id) {
            len = r->regs[i].end - r->regs[i].base;
            memmove(&r->regs[i], &r->regs[i + 1], (r->nregs - i - 1) * sizeof(*r->regs));
            r->nregs--;
            dxl__rebuild_max(r, i);
            found = 1;
            break;
        }
    }
    if (r->nregs == 0) {
        free(r->regs); /* leave nothing behind for leak checkers once all is unregistered */
        r->regs = NULL;
        r->capregs = 0;
    }
    pthread_rwlock_unlock(&r->lock);

    if (!found) {
        return dxl__fail(DXL_E_NOENT, 0);
    }
    DXL__SUB(dxl__n_regions, 1);
    DXL__SUB(dxl__n_bytes_registered, len);
    return DXL_OK;
}

/* 1 if [addr, addr + len) lies in one region of r; the caller holds r's lock and len > 0. */
static int dxl__inside(const dxl_registry_t *r, uint64_t addr, uint64_t len)
{
    uint64_t end;
    uint64_t i;

    if (addr > UINT64_MAX - len) {
        return 0;
    }
    end = addr + len;
    for (i = dxl__upper(r, addr); i > 0; i--) {
        const dxl__region_t *g = &r->regs[i - 1];
        if (g->max_end < end) {
            return 0; /* no region at or below this one reaches far enough */
        }
        if (g->end >= end) {
            return 1; /* g->base <= addr holds by the search */
        }
    }
    return 0;
}

int dxl_region_check(dxl_registry_t *r, uint64_t addr, uint64_t len)
{
    int ok;

    if (r == NULL) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    if (len == 0) {
        return DXL_OK;
    }
    pthread_rwlock_rdlock(&r->lock);
    ok = dxl__inside(r, addr, len);
    pthread_rwlock_unlock(&r->lock);
    return ok ? DXL_OK : dxl__fail(DXL_E_RANGE, 0);
}

int dxl_region_check_pieces(dxl_registry_t *r, const uint64_t *addr, const uint64_t *len,
                            uint64_t n, uint64_t *bad_index_p)
{
    uint64_t i;
    int ok = 1;

    if (r == NULL || (n > 0 && (addr == NULL || len == NULL))) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    pthread_rwlock_rdlock(&r->lock);
    for (i = 0; i < n; i++) {
        if (len[i] != 0 && !dxl__inside(r, addr[i], len[i])) {
            ok = 0;
            break;
        }
    }
    pthread_rwlock_unlock(&r->lock);

    if (!ok) {
        if (bad_index_p != NULL) {
            *bad_index_p = i;
        }
        return dxl__fail(DXL_E_RANGE, 0);
    }
    return DXL_OK;
}
