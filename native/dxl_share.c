/*
 * dxl_share.c: moves registered memory onto a memfd in place, so that same-host peers can map it
 * and copy with memcpy instead of a process_vm_readv walk of the page tables per 4 KiB page.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "dxl.h"
#include "dxl_internal.h"

#define DXL__SHARE_CHUNK (32ull << 20)

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux >= 5.14 */
#endif

static int dxl__all_zero(const unsigned char *p, uint64_t n)
{
    /* p[0] == 0 and every byte equals its successor: one streaming compare, no table */
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, (size_t)(n - 1)) == 0);
}

static int dxl__write_all(int fd, const unsigned char *p, uint64_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t w = pwrite(fd, p, (size_t)n, (off_t)off);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            return w < 0 ? errno : EIO;
        }
        p += w;
        n -= (uint64_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

int dxl_share_in_place(uint64_t addr, uint64_t len, uint64_t chunk, int *fd_p)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    int fd;
    int err = 0;

    if (chunk == 0) {
        chunk = DXL__SHARE_CHUNK;
    }
    if (fd_p == NULL || addr == 0 || len == 0 || addr % page || len % page || chunk % page ||
        addr + len < addr) {
        return dxl__fail(DXL_E_INVAL, EINVAL);
    }
    fd = memfd_create("dxl-share", MFD_CLOEXEC);
    if (fd < 0) {
        return dxl__fail(dxl__map_errno(errno), errno);
    }
    if (ftruncate(fd, (off_t)len) != 0) {
        err = errno;
        goto fail;
    }
    for (uint64_t off = 0; off < len; off += chunk) {
        uint64_t n = len - off < chunk ? len - off : chunk;
        unsigned char *at = (unsigned char *)(uintptr_t)(addr + off);
        if (!dxl__all_zero(at, n)) {
            err = dxl__write_all(fd, at, n, off);
            if (err != 0) {
                goto fail;
            }
        }
        /* replaces the private pages of this chunk by the memfd's, which hold the same bytes */
        if (mmap(at, (size_t)n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, (off_t)off) ==
            MAP_FAILED) {
            err = errno;
            goto fail;
        }
    }
    *fd_p = fd;
    return DXL_OK;
fail:
    close(fd);
    return dxl__fail(err == ENOMEM || err == ENOSPC ? DXL_E_NOMEM : DXL_E_IO, err);
}

int dxl_prefault(uint64_t addr, uint64_t len)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);

    if (addr % page || len == 0 || addr + len < addr) {
        return dxl__fail(DXL_E_INVAL, EINVAL);
    }
    if (madvise((void *)(uintptr_t)addr, (size_t)len, MADV_POPULATE_WRITE) == 0) {
        return DXL_OK;
    }
    if (errno != EINVAL) { /* ENOMEM: not (or no longer) mapped; EFAULT: past the file's end */
        return dxl__fail(dxl__map_errno(errno), errno);
    }
    /* older kernel: a read per page maps it too (a shared mapping needs no copy on write) */
    for (uint64_t off = 0; off < len; off += page) {
        (void)*(volatile const unsigned char *)(uintptr_t)(addr + off);
    }
    return DXL_OK;
}
