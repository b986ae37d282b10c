/*
 * dxl_registry.c: the process-wide table of registered local regions, for bounds checks.
 *
 * Regions sit in an array sorted by base, with a running maximum of their ends (max_end[i] is the
 * largest end among regions 0..i). A check finds the last region whose base is <= addr by binary
 * search, then walks down while max_end still reaches the piece's end: with no overlap that is one
 * step. Adds and removes rebuild the running maximum (the table is small; checks dominate). A
 * rwlock lets checks from many threads run together.
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

static pthread_rwlock_t dxl__reg_lock = PTHREAD_RWLOCK_INITIALIZER;
static dxl__region_t *dxl__regs;
static uint64_t dxl__nregs;
static uint64_t dxl__capregs;
static uint64_t dxl__next_id = 1;

static void dxl__rebuild_max(uint64_t from)
{
    uint64_t m = from > 0 ? dxl__regs[from - 1].max_end : 0;
    for (uint64_t i = from; i < dxl__nregs; i++) {
        if (dxl__regs[i].end > m) {
            m = dxl__regs[i].end;
        }
        dxl__regs[i].max_end = m;
    }
}

/* Number of regions with base <= addr (so the candidate is that count minus one). */
static uint64_t dxl__upper(uint64_t addr)
{
    uint64_t lo = 0;
    uint64_t hi = dxl__nregs;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (dxl__regs[mid].base <= addr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

int dxl_region_add(uint64_t base, uint64_t len, uint64_t *id_p)
{
    uint64_t at;

    if (id_p == NULL || len == 0 || base > UINT64_MAX - len) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    pthread_rwlock_wrlock(&dxl__reg_lock);
    if (dxl__nregs == dxl__capregs) {
        uint64_t cap = dxl__capregs ? 2 * dxl__capregs : 16;
        dxl__region_t *grown = realloc(dxl__regs, cap * sizeof(*grown));
        if (grown == NULL) {
            pthread_rwlock_unlock(&dxl__reg_lock);
            return dxl__fail(DXL_E_NOMEM, ENOMEM);
        }
        dxl__regs = grown;
        dxl__capregs = cap;
    }
    at = dxl__upper(base);
    memmove(&dxl__regs[at + 1], &dxl__regs[at], (dxl__nregs - at) * sizeof(*dxl__regs));
    dxl__regs[at] = (dxl__region_t){.id = dxl__next_id++, .base = base, .end = base + len};
    dxl__nregs++;
    dxl__rebuild_max(at);
    *id_p = dxl__regs[at].id;
    pthread_rwlock_unlock(&dxl__reg_lock);

    DXL__ADD(dxl__n_regions, 1);
    DXL__ADD(dxl__n_bytes_registered, len);
    return DXL_OK;
}

int dxl_region_remove(uint64_t id)
{
    uint64_t len = 0;
    int found = 0;

    pthread_rwlock_wrlock(&dxl__reg_lock);
    for (uint64_t i = 0; i < dxl__nregs; i++) {
        if (dxl__regs[i].id == id) {
            len = dxl__regs[i].end - dxl__regs[i].base;
            memmove(&dxl__regs[i], &dxl__regs[i + 1], (dxl__nregs - i - 1) * sizeof(*dxl__regs));
            dxl__nregs--;
            dxl__rebuild_max(i);
            found = 1;
            break;
        }
    }
    if (dxl__nregs == 0) {
        free(dxl__regs); /* leave nothing behind for leak checkers once all is unregistered */
        dxl__regs = NULL;
        dxl__capregs = 0;
    }
    pthread_rwlock_unlock(&dxl__reg_lock);

    if (!found) {
        return dxl__fail(DXL_E_NOENT, 0);
    }
    DXL__SUB(dxl__n_regions, 1);
    DXL__SUB(dxl__n_bytes_registered, len);
    return DXL_OK;
}

/* 1 if [addr, addr + len) lies in one region; the caller holds the lock and len > 0. */
static int dxl__inside(uint64_t addr, uint64_t len)
{
    uint64_t end;
    uint64_t i;

    if (addr > UINT64_MAX - len) {
        return 0;
    }
    end = addr + len;
    for (i = dxl__upper(addr); i > 0; i--) {
        const dxl__region_t *r = &dxl__regs[i - 1];
        if (r->max_end < end) {
            return 0; /* no region at or below this one reaches far enough */
        }
        if (r->end >= end) {
            return 1; /* r->base <= addr holds by the search */
        }
    }
    return 0;
}

int dxl_region_check(uint64_t addr, uint64_t len)
{
    int ok;

    if (len == 0) {
        return DXL_OK;
    }
    pthread_rwlock_rdlock(&dxl__reg_lock);
    ok = dxl__inside(addr, len);
    pthread_rwlock_unlock(&dxl__reg_lock);
    return ok ? DXL_OK : dxl__fail(DXL_E_RANGE, 0);
}

int dxl_region_check_pieces(const uint64_t *addr, const uint64_t *len, uint64_t n,
                            uint64_t *bad_index_p)
{
    uint64_t i;
    int ok = 1;

    if (n > 0 && (addr == NULL || len == NULL)) {
        return dxl__fail(DXL_E_INVAL, 0);
    }
    pthread_rwlock_rdlock(&dxl__reg_lock);
    for (i = 0; i < n; i++) {
        if (len[i] != 0 && !dxl__inside(addr[i], len[i])) {
            ok = 0;
            break;
        }
    }
    pthread_rwlock_unlock(&dxl__reg_lock);

    if (!ok) {
        if (bad_index_p != NULL) {
            *bad_index_p = i;
        }
        return dxl__fail(DXL_E_RANGE, 0);
    }
    return DXL_OK;
}
