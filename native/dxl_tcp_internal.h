/*
 * dxl_tcp_internal.h: what the tcp transport's files share (dxl_tcp_wire.c, dxl_tcp_server.c,
 * dxl_tcp_client.c) and Python never sees: the frame layout's codec and a few socket helpers.
 * Include after <stdint.h> and "dxl.h". Internal non-static names start with dxl__. The wire
 * format itself is documented once, in dxl.h.
 */
#ifndef DXL_TCP_INTERNAL_H
#define DXL_TCP_INTERNAL_H

#include <endian.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

_Static_assert(DXL_TCP_HDR_BYTES == 32, "the header layouts below are 32 bytes");

/* ---- little-endian fields ---- */

/* Inline, unlike the rest of the codec: the table is encoded (client) and decoded (server) one
 * 16-byte entry at a time, up to DXL_TCP_MAX_PIECES entries per request. */
static inline void dxl__put16(unsigned char *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof(v));
}

static inline void dxl__put32(unsigned char *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof(v));
}

static inline void dxl__put64(unsigned char *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, sizeof(v));
}

static inline uint16_t dxl__get16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return le16toh(v);
}

static inline uint32_t dxl__get32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return le32toh(v);
}

static inline uint64_t dxl__get64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

/* ---- frames (dxl_tcp_wire.c) ---- */

/* One table entry: u64 addr, u64 len. */
#define DXL__TCP_ENTRY_BYTES 16

static inline void dxl__entry_put(unsigned char *table, uint64_t i, uint64_t addr, uint64_t len)
{
    dxl__put64(table + DXL__TCP_ENTRY_BYTES * i, addr);
    dxl__put64(table + DXL__TCP_ENTRY_BYTES * i + 8, len);
}

static inline void dxl__entry_get(const unsigned char *table, uint64_t i, uint64_t *addr_p,
                                  uint64_t *len_p)
{
    *addr_p = dxl__get64(table + DXL__TCP_ENTRY_BYTES * i);
    *len_p = dxl__get64(table + DXL__TCP_ENTRY_BYTES * i + 8);
}

/* Request header: magic@0 version@4 op@6 id@8 n@16 total@24. */
typedef struct {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint64_t id;
    uint64_t n;
    uint64_t total;
} dxl__req_t;

/* Reply header: magic@0 version@4 op@6 id@8 status@16 detail@20 total@24. */
typedef struct {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint64_t id;
    int32_t status;
    uint32_t detail;
    uint64_t total;
} dxl__rep_t;

/* Writes a request header (DXL_TCP_HDR_BYTES) of this version to b. */
void dxl__req_encode(unsigned char *b, uint16_t op, uint64_t id, uint64_t n, uint64_t total);

dxl__req_t dxl__req_decode(const unsigned char *b);

/* The header alone, as the server sees it before the table: DXL_OK, DXL_E_PROTO (bad magic,
 * unknown op, more than DXL_TCP_MAX_PIECES entries) or DXL_E_UNSUPPORTED (another version). The
 * table is checked by the server's gate, which also asks the registry. */
int dxl__req_check(const dxl__req_t *req);

/* Writes a reply header (DXL_TCP_HDR_BYTES) of this version to b. */
void dxl__rep_encode(unsigned char *b, uint16_t op, uint64_t id, int32_t status, uint32_t detail,
                     uint64_t total);

dxl__rep_t dxl__rep_decode(const unsigned char *b);

/* Checks a reply against the request it answers (op, id, and `bytes`, the request's total):
 * DXL_OK, DXL_E_REMOTE (a well-formed refusal: rep->status and rep->detail say why) or
 * DXL_E_PROTO (anything else that does not match). */
int dxl__rep_check(const dxl__rep_t *rep, uint16_t op, uint64_t id, uint64_t bytes);

/* ---- sockets (dxl_tcp_wire.c) ---- */

/* Maps an errno from a socket call to a DXL_E_* code. */
int dxl__sock_code(int err);

/* Consumes `bytes` from the front of iov[*i ..], leaving *i at the first entry with bytes left. */
void dxl__iov_advance(struct iovec *iov, size_t cnt, size_t *i, size_t bytes);

#endif /* DXL_TCP_INTERNAL_H */
