/*
 * dxl_common.c: return codes and their names, the per-thread saved errno, and the counters.
 */
#include <errno.h>
#include <stdint.h>

#include "dxl.h"
#include "dxl_internal.h"

/* ---- return codes: one table gives the names and the messages ---- */

#define DXL_ERR_MAP(XX)                                                                     \
    XX(DXL_OK, "ok")                                                                        \
    XX(DXL_E_INVAL, "invalid argument")                                                     \
    XX(DXL_E_NOMEM, "out of memory")                                                        \
    XX(DXL_E_SRCH, "peer process is gone")                                                  \
    XX(DXL_E_PERM, "cross-memory attach not permitted (ptrace policy)")                     \
    XX(DXL_E_FAULT, "address range not mapped")                                             \
    XX(DXL_E_SHORT, "transfer stopped making progress")                                     \
    XX(DXL_E_NOENT, "unknown id")                                                           \
    XX(DXL_E_RANGE, "piece outside every registered region")                                \
    XX(DXL_E_IO, "system call failed")                                                      \
    XX(DXL_E_UNSUPPORTED, "not supported by this kernel or build")                          \
    XX(DXL_E_TIMEDOUT, "timed out")                                                         \
    XX(DXL_E_PEER, "peer closed or reset the connection")                                   \
    XX(DXL_E_PROTO, "malformed or mismatched protocol frame")                               \
    XX(DXL_E_REMOTE, "the peer's data server refused the request")                          \
    XX(DXL_E_LIMIT, "a limit on connections was reached")

const char *dxl_strerror(int code)
{
    switch (code) {
#define XX(name, msg) \
    case name:        \
        return msg;
        DXL_ERR_MAP(XX)
#undef XX
    default:
        return "unknown dxl error";
    }
}

const char *dxl_err_name(int code)
{
    switch (code) {
#define XX(name, msg) \
    case name:        \
        return #name;
        DXL_ERR_MAP(XX)
#undef XX
    default:
        return "DXL_E_UNKNOWN";
    }
}

static _Thread_local int dxl__saved_errno;

int dxl_last_errno(void)
{
    return dxl__saved_errno;
}

int dxl__fail(int code, int err)
{
    dxl__saved_errno = err;
    return code;
}

int dxl__map_errno(int err)
{
    switch (err) {
    case EFAULT:
        return DXL_E_FAULT;
    case EPERM:
    case EACCES:
        return DXL_E_PERM;
    case ESRCH:
        return DXL_E_SRCH;
    case ENOMEM:
        return DXL_E_NOMEM;
    case EINVAL:
        return DXL_E_INVAL;
    case ENOSYS:
        return DXL_E_UNSUPPORTED;
    default:
        return DXL_E_IO;
    }
}

/* ---- counters ---- */

uint64_t dxl__n_regions;
uint64_t dxl__n_peers;
uint64_t dxl__n_inflight;
uint64_t dxl__n_bytes_registered;
uint64_t dxl__n_split;
uint64_t dxl__n_registries;

void dxl_counters(dxl_counters_t *out_p)
{
    if (out_p == NULL) {
        return;
    }
    out_p->regions_live = __atomic_load_n(&dxl__n_regions, __ATOMIC_RELAXED);
    out_p->peers_open = __atomic_load_n(&dxl__n_peers, __ATOMIC_RELAXED);
    out_p->ops_inflight = __atomic_load_n(&dxl__n_inflight, __ATOMIC_RELAXED);
    out_p->bytes_registered = __atomic_load_n(&dxl__n_bytes_registered, __ATOMIC_RELAXED);
    out_p->ops_split = __atomic_load_n(&dxl__n_split, __ATOMIC_RELAXED);
    out_p->registries_live = __atomic_load_n(&dxl__n_registries, __ATOMIC_RELAXED);
}
