/*
 * dxl_share.c: moves registered memory onto a memfd in place, so that same-host peers can map it
 * and copy with memcpy instead of a process_vm_readv walk of the page tables per 4 KiB page, and
 * moves it back to private memory when the last registration using it ends.
 *
 * Moving pages in place races with the owner's other threads: a write that lands in the old
 * private page after the chunk was copied would be lost when the memfd is mapped over it. So each
 * chunk is write-protected with userfaultfd first: a thread that writes to it meanwhile blocks in
 * the kernel until the chunk is remapped, and then retries its write on the new, shared page.
 * Where userfaultfd write protection is not available, nothing is moved (DXL_E_UNSUPPORTED): a
 * lost write is never an option.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "dxl.h"
#include "dxl_internal.h"

#define DXL__SHARE_CHUNK (32ull << 20)

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux >= 5.14 */
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif
#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#define F_SEAL_SEAL 0x0001
#define F_SEAL_SHRINK 0x0002
#define F_SEAL_GROW 0x0004
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

/* A userfaultfd with write-protect faults, or -errno. Without the privilege for kernel-mode
 * faults (vm.unprivileged_userfaultfd=0) it handles user-mode faults only: a system call that
 * writes into a protected chunk then fails with EFAULT instead of waiting, which loses nothing. */
static int dxl__uffd_open(void)
{
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP};
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

    if (fd < 0 && errno == EPERM) {
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    }
    if (fd < 0) {
        return -errno;
    }
    if (ioctl(fd, UFFDIO_API, &api) != 0 || !(api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
        int err = errno ? errno : ENOTSUP;
        close(fd);
        return -err;
    }
    return fd;
}

/* Write-protects [at, at + n) through the userfaultfd uffd: from here until uffd is closed, a
 * write to it blocks. Every page is made present first, since write protection covers present
 * pages only (a never-touched page would otherwise take a write as a plain missing-page fault). */
static int dxl__write_protect(int uffd, unsigned char *at, uint64_t n)
{
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)at, .len = n},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    struct uffdio_writeprotect wp = {
        .range = {.start = (uintptr_t)at, .len = n},
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };

    if (madvise(at, (size_t)n, MADV_POPULATE_WRITE) != 0) {
        return errno == EINVAL ? ENOTSUP : errno; /* EINVAL: a kernel older than 5.14 */
    }
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0 || ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) {
        return errno;
    }
    return 0;
}

/* Moves one chunk: protect, copy into the memfd, map the memfd over it, then close the uffd,
 * which wakes every writer that blocked meanwhile: its write retries on the shared page. */
static int dxl__move_chunk(int fd, unsigned char *at, uint64_t n, uint64_t off)
{
    int err;
    int uffd = dxl__uffd_open();

    if (uffd < 0) {
        return -uffd == EINVAL || -uffd == ENOSYS || -uffd == EPERM ? ENOTSUP : -uffd;
    }
    err = dxl__write_protect(uffd, at, n);
    if (err == 0 && !dxl__all_zero(at, n)) {
        err = dxl__write_all(fd, at, n, off);
    }
    if (err == 0 && mmap(at, (size_t)n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd,
                         (off_t)off) == MAP_FAILED) {
        err = errno;
    }
    close(uffd); /* on failure the old pages stay, unprotected: nothing moved, nothing lost */
    return err;
}

int dxl_share_in_place(uint64_t addr, uint64_t len, uint64_t chunk, int *fd_p)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    uint64_t moved = 0;
    int fd;
    int err = 0;

    if (chunk == 0) {
        chunk = DXL__SHARE_CHUNK;
    }
    if (fd_p == NULL || addr == 0 || len == 0 || addr % page || len % page || chunk % page ||
        addr + len < addr) {
        return dxl__fail(DXL_E_INVAL, EINVAL);
    }
    fd = memfd_create("dxl-share", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        return dxl__fail(dxl__map_errno(errno), errno);
    }
    /* sized once and sealed: a process that opens it (through /proc/<pid>/fd) cannot shrink it
     * under us (a SIGBUS for the owner) nor grow it */
    if (ftruncate(fd, (off_t)len) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        err = errno;
        goto fail;
    }
    for (uint64_t off = 0; off < len; off += chunk) {
        uint64_t n = len - off < chunk ? len - off : chunk;
        err = dxl__move_chunk(fd, (unsigned char *)(uintptr_t)(addr + off), n, off);
        if (err != 0) {
            goto fail;
        }
        moved = off + n;
    }
    *fd_p = fd;
    return DXL_OK;
fail:
    if (moved > 0) { /* the chunks already moved go back to private pages, same bytes */
        (void)mmap((void *)(uintptr_t)addr, (size_t)moved, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_FIXED, fd, 0);
    }
    close(fd);
    if (err == ENOTSUP) {
        return dxl__fail(DXL_E_UNSUPPORTED, err);
    }
    return dxl__fail(err == ENOMEM || err == ENOSPC ? DXL_E_NOMEM : DXL_E_IO, err);
}

int dxl_share_release(uint64_t addr, uint64_t len, int fd)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);

    if (addr == 0 || len == 0 || addr % page || len % page || addr + len < addr || fd < 0) {
        return dxl__fail(DXL_E_INVAL, EINVAL);
    }
    /* A private mapping of the same memfd: it shows every byte written to the shared mapping up
     * to the switch (they are in the memfd), and from then on writes copy the page, so the memory
     * is private again (fork() copies it, peers that still map the memfd no longer see it). */
    if (mmap((void *)(uintptr_t)addr, (size_t)len, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED) {
        return dxl__fail(dxl__map_errno(errno), errno);
    }
    return DXL_OK;
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
