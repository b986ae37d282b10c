/*
 * dxl_copy.c: local piece copies (memcpy), the baseline that CMA is measured against and the
 * data path of local copy operations.
 */
#include <stdint.h>
#include <string.h>

#include "dxl.h"
#include "dxl_internal.h"

typedef struct {
    const uint64_t *dst;
    const uint64_t *src;
    const uint64_t *len;
} dxl__copy_args_t;

static void dxl__copy_slice(dxl__slice_t *s)
{
    const dxl__copy_args_t *a = s->ctx;
    dxl__pos_t p = s->begin;

    while (!dxl__pos_done(&p, &s->end)) {
        uint64_t left = dxl__piece_left(&p, &s->end, a->len);
        if (left > 0) {
            memcpy((void *)(uintptr_t)(a->dst[p.piece] + p.off),
                   (const void *)(uintptr_t)(a->src[p.piece] + p.off), (size_t)left);
            s->done += left;
        }
        p.piece++;
        p.off = 0;
    }
}

int dxl_copy_pieces(const uint64_t *dst, const uint64_t *src, const uint64_t *len, uint64_t n,
                    int max_threads)
{
    dxl__copy_args_t args = {.dst = dst, .src = src, .len = len};
    uint64_t total = 0;
    int rc = dxl__pieces_total(dst, src, len, n, &total);

    if (rc != DXL_OK || total == 0) {
        return rc;
    }
    DXL__ADD(dxl__n_inflight, 1);
    rc = dxl__run_split(len, n, total, max_threads, dxl__copy_slice, &args, NULL);
    DXL__SUB(dxl__n_inflight, 1);
    return rc;
}
