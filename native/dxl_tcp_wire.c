/*
 * dxl_tcp_wire.c: the tcp transport's frame codec, shared by the data server (dxl_tcp_server.c)
 * and the client (dxl_tcp_client.c): request and reply headers encoded, decoded and checked, plus
 * the socket helpers both sides use. The format is documented in dxl.h; the table entry codec and
 * the little-endian fields are inline in dxl_tcp_internal.h. Nothing here touches memory named by
 * a table: that is the server's gate (dxl_tcp_server.c).
 */
#include <errno.h>
#include <stdint.h>
#include <sys/uio.h>

#include "dxl.h"
#include "dxl_tcp_internal.h"

/* ---- headers ---- */

void dxl__req_encode(unsigned char *b, uint16_t op, uint64_t id, uint64_t n, uint64_t total)
{
    dxl__put32(b, DXL_TCP_REQ_MAGIC);
    dxl__put16(b + 4, DXL_TCP_VERSION);
    dxl__put16(b + 6, op);
    dxl__put64(b + 8, id);
    dxl__put64(b + 16, n);
    dxl__put64(b + 24, total);
}

dxl__req_t dxl__req_decode(const unsigned char *b)
{
    return (dxl__req_t){.magic = dxl__get32(b),
                        .version = dxl__get16(b + 4),
                        .op = dxl__get16(b + 6),
                        .id = dxl__get64(b + 8),
                        .n = dxl__get64(b + 16),
                        .total = dxl__get64(b + 24)};
}

int dxl__req_check(const dxl__req_t *req)
{
    if (req->magic != DXL_TCP_REQ_MAGIC) {
        return DXL_E_PROTO;
    }
    if (req->version != DXL_TCP_VERSION) {
        return DXL_E_UNSUPPORTED;
    }
    if (req->op != DXL_TCP_OP_READ && req->op != DXL_TCP_OP_WRITE) {
        return DXL_E_PROTO;
    }
    if (req->n > DXL_TCP_MAX_PIECES) {
        return DXL_E_PROTO;
    }
    return DXL_OK;
}

void dxl__rep_encode(unsigned char *b, uint16_t op, uint64_t id, int32_t status, uint32_t detail,
                     uint64_t total)
{
    dxl__put32(b, DXL_TCP_REP_MAGIC);
    dxl__put16(b + 4, DXL_TCP_VERSION);
    dxl__put16(b + 6, op);
    dxl__put64(b + 8, id);
    dxl__put32(b + 16, (uint32_t)status);
    dxl__put32(b + 20, detail);
    dxl__put64(b + 24, total);
}

dxl__rep_t dxl__rep_decode(const unsigned char *b)
{
    return (dxl__rep_t){.magic = dxl__get32(b),
                        .version = dxl__get16(b + 4),
                        .op = dxl__get16(b + 6),
                        .id = dxl__get64(b + 8),
                        .status = (int32_t)dxl__get32(b + 16),
                        .detail = dxl__get32(b + 20),
                        .total = dxl__get64(b + 24)};
}

int dxl__rep_check(const dxl__rep_t *rep, uint16_t op, uint64_t id, uint64_t bytes)
{
    if (rep->magic != DXL_TCP_REP_MAGIC || rep->version != DXL_TCP_VERSION || rep->op != op ||
        rep->id != id) {
        return DXL_E_PROTO;
    }
    if (rep->status != DXL_OK) {
        /* An error status is a negative code with nothing following it. */
        if (rep->status > 0 || rep->total != 0) {
            return DXL_E_PROTO;
        }
        return DXL_E_REMOTE;
    }
    return rep->total == bytes ? DXL_OK : DXL_E_PROTO;
}

/* ---- sockets ---- */

int dxl__sock_code(int err)
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

void dxl__iov_advance(struct iovec *iov, size_t cnt, size_t *i, size_t bytes)
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
