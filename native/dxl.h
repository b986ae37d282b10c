/*
 * dxl.h: the C API of the dxl native shim, and at the same time its cffi cdef.
 *
 * native/build_ffi.py feeds this file verbatim to ffi.cdef(), so it holds only declarations that
 * cffi can parse: no include guards, no #include, no function-like macros, and integer-valued
 * #defines only. A C file includes <stdint.h> before it.
 *
 * Conventions
 * - Every function that can fail returns int: DXL_OK (0) or a negative DXL_E_* code. It then also
 *   saves the errno that explains the failure (0 when there is none) where dxl_last_errno() finds
 *   it, in the calling thread.
 * - Output pointers end in _p and come last. Unless a comment says otherwise they are written on
 *   success only.
 * - Ownership: unless a comment says otherwise, no function keeps any pointer argument after it
 *   returns; arrays are read during the call only and stay owned by the caller.
 * - Addresses are uint64_t (virtual addresses in this process, "local", or in the peer, "remote").
 * - Everything here is thread-safe unless a comment says otherwise.
 */

/* ---- return codes ---------------------------------------------------------------------------- */

#define DXL_OK 0
#define DXL_E_INVAL -1        /* bad argument (NULL array, zero length, address overflow...) */
#define DXL_E_NOMEM -2        /* out of memory (here, or ENOMEM from the kernel) */
#define DXL_E_SRCH -3         /* the peer process is gone (its pidfd says so, or ESRCH) */
#define DXL_E_PERM -4         /* kernel/ptrace policy forbids cross-memory attach (EPERM) */
#define DXL_E_FAULT -5        /* an address range is not mapped (EFAULT), here or in the peer */
#define DXL_E_SHORT -6        /* a transfer stopped making progress, with no errno */
#define DXL_E_NOENT -7        /* unknown id */
#define DXL_E_RANGE -8        /* a piece lies outside every registered region */
#define DXL_E_IO -9           /* any other errno */
#define DXL_E_UNSUPPORTED -10 /* this kernel or build cannot do it (e.g. ENOSYS) */

/* Most pieces one process_vm_readv/writev call takes (the kernel's IOV_MAX). */
#define DXL_IOV_MAX 1024
/* Upper bound on max_threads; larger values are clamped to it. */
#define DXL_MAX_THREADS 16

/* The errno saved by the calling thread's last failing dxl call (0 if that failure had none). */
int dxl_last_errno(void);

/* A static, human-readable description of a DXL_* code ("peer process is gone"). Never NULL;
 * unknown codes give "unknown dxl error". The caller must not free it. */
const char *dxl_strerror(int code);

/* The static name of a DXL_* code ("DXL_E_SRCH"). Never NULL; unknown codes give "DXL_E_UNKNOWN".
 * The caller must not free it. */
const char *dxl_err_name(int code);

/* ---- registries of local regions ------------------------------------------------------------ */
/* A registry is a table of the memory ranges of this process that peers may touch through one
 * data server (an engine owns one; a data server checks every request against the registry it was
 * started with, and against no other). Registries are independent: a region added to one is
 * unknown to every other. Regions may overlap, and the same range may be registered twice (two
 * caches over one allocation): each add gives a new id, and each id is removed on its own. Ids
 * are per registry: they start at 1 and are never reused within it. Registering memory does not
 * pin or touch it; a registry only answers bounds checks. Every function below taking a registry
 * returns DXL_E_INVAL for a NULL one. */
typedef struct dxl_registry dxl_registry_t;

/* Creates an empty registry. On success *registry_p (not NULL, else DXL_E_INVAL) receives a
 * handle the caller owns and must release with dxl_registry_free(). DXL_E_NOMEM, DXL_E_IO. */
int dxl_registry_new(dxl_registry_t **registry_p);

/* Frees the registry and every region still in it (they leave the counters too); NULL is a
 * no-op. The caller must make sure that nothing uses it any more: no call on it is running and no
 * data server started with it is still running (stop those first, dxl_tcp_server_stop). */
void dxl_registry_free(dxl_registry_t *registry);

/* Registers [base, base + len). len must be > 0 and base + len must not wrap: else DXL_E_INVAL.
 * Writes the new region's id to *id_p (caller-owned, must not be NULL). DXL_E_NOMEM. */
int dxl_region_add(dxl_registry_t *registry, uint64_t base, uint64_t len, uint64_t *id_p);

/* Unregisters the region with this id: DXL_OK, or DXL_E_NOENT if no live region of this
 * registry has it. A data server may still be touching the memory (a request that passed its
 * check before): dxl_tcp_server_fence() waits for that. */
int dxl_region_remove(dxl_registry_t *registry, uint64_t id);

/* DXL_OK if [addr, addr + len) lies inside one live region of the registry, else DXL_E_RANGE
 * (also when the range wraps past 2^64). A zero-length range touches no memory and is always
 * DXL_OK. */
int dxl_region_check(dxl_registry_t *registry, uint64_t addr, uint64_t len);

/* dxl_region_check for n pieces (addr[i], len[i]), under one lock: DXL_OK if every piece passes,
 * else DXL_E_RANGE. addr and len are caller-owned arrays of n entries, read during the call only;
 * they may be NULL when n == 0 (else DXL_E_INVAL). If bad_index_p is not NULL it receives the index
 * of the first failing piece (on DXL_E_RANGE only). */
int dxl_region_check_pieces(dxl_registry_t *registry, const uint64_t *addr, const uint64_t *len,
                            uint64_t n, uint64_t *bad_index_p);

/* ---- peers for cross-memory attach (CMA) ----------------------------------------------------- */

/* An opened peer process: its pid and, where the kernel has pidfd_open (Linux >= 5.3), a pidfd
 * that tells reliably whether that very process has exited. Without a pidfd only the pid is kept
 * and a dead peer's pid may be reused by an unrelated process before we notice: transfers then
 * touch the wrong process. dxl_peer_has_pidfd() says which case holds. */
typedef struct dxl_peer dxl_peer_t;

/* Opens the peer with this pid (> 0, else DXL_E_INVAL; DXL_E_SRCH if no such process). On success
 * *peer_p receives a handle the caller owns and must release with dxl_peer_close(). */
int dxl_peer_open(int pid, dxl_peer_t **peer_p);

/* 1 if the peer is still running, 0 if it has exited (a zombie counts as exited where there is a
 * pidfd), or a negative DXL_E_* code (DXL_E_INVAL for NULL). Does not block. */
int dxl_peer_alive(const dxl_peer_t *peer);

/* The peer's pid, or DXL_E_INVAL for NULL. */
int dxl_peer_pid(const dxl_peer_t *peer);

/* 1 if the peer is tracked through a pidfd, 0 if through its pid only, DXL_E_INVAL for NULL. */
int dxl_peer_has_pidfd(const dxl_peer_t *peer);

/* Duplicates the peer's descriptor fd into this process (pidfd_getfd, Linux >= 5.6): the same open
 * file description, so the access mode is the one the peer opened it with, whoever we are. Needs
 * the peer's pidfd (else DXL_E_UNSUPPORTED), a kernel with the call (ENOSYS: DXL_E_UNSUPPORTED)
 * and the ptrace access that cross-memory attach needs (EPERM, which a seccomp filter may also
 * answer: DXL_E_PERM). DXL_E_INVAL: NULL or fd < 0; DXL_E_IO with errno EBADF: fd is not open.
 * On success *fd_p receives a close-on-exec descriptor the caller owns and must close(). */
int dxl_peer_getfd(const dxl_peer_t *peer, int fd, int *fd_p);

/* Closes the pidfd and frees the handle; NULL is a no-op. The caller must make sure that no
 * transfer is using the handle, and must not use it afterwards. */
void dxl_peer_close(dxl_peer_t *peer);

/* ---- transfers ------------------------------------------------------------------------------- */

/* Moves n pieces between this process and the peer with process_vm_readv (write = 0: remote ->
 * local, a pull) or process_vm_writev (write = 1: local -> remote, a push). Piece i is len[i]
 * bytes at local[i] here and remote[i] in the peer; pieces of length 0 are skipped and n == 0 is a
 * no-op. local, remote and len are caller-owned arrays of n entries, read during the call only.
 *
 * Up to DXL_IOV_MAX pieces go in one syscall, and a partial return resumes at the exact byte where
 * the kernel stopped. A call of T bytes runs on min(max_threads, T / dxl_split_threshold())
 * threads (max_threads <= 1: the calling thread only): the calling thread plus workers of a small
 * persistent pool, started on first use, which claim contiguous chunks of the piece list of
 * roughly equal bytes (a single large piece may be cut too). The calling thread always works
 * and never waits for a busy pool. Destination ranges should not overlap: with a split, which
 * piece lands last is not defined.
 *
 * The peer is checked alive before and after the copy: if it has exited by the end the bytes may
 * come from another process that reused its pid, so the call fails with DXL_E_SRCH. Errors:
 * DXL_E_INVAL (NULL peer, NULL array with n > 0, write not 0/1, a range wraps; or EINVAL),
 * DXL_E_SRCH, DXL_E_PERM (EPERM, EACCES), DXL_E_FAULT (local or remote range unmapped),
 * DXL_E_NOMEM, DXL_E_SHORT (no progress and no errno), DXL_E_UNSUPPORTED (ENOSYS), DXL_E_IO.
 * On failure the destination may hold any mix of old and new bytes.
 *
 * If bytes_done_p is not NULL it receives the number of bytes moved, on failure too. */
int dxl_cma_transfer(const dxl_peer_t *peer, int write, const uint64_t *local,
                     const uint64_t *remote, const uint64_t *len, uint64_t n, int max_threads,
                     uint64_t *bytes_done_p);

/* dxl_cma_transfer, except that pieces lying wholly inside a window the peer shares with us are
 * copied with memcpy through our mapping of it instead of by syscall. windows holds nwin triples
 * {remote_start, remote_end, local_start}: the peer's [remote_start, remote_end) is mapped here at
 * local_start; sorted by remote_start, non-empty, disjoint, not wrapping (else DXL_E_INVAL). The
 * caller keeps every window mapped for the whole call. Other pieces, and pieces only partly
 * inside a window, go through process_vm_readv/writev as in dxl_cma_transfer. nwin == 0 is
 * dxl_cma_transfer. The alive checks before and after cover the shared pieces too: a dead peer's
 * mapping outlives it, but its bytes no longer mean anything. */
int dxl_cma_transfer_mapped(const dxl_peer_t *peer, int write, const uint64_t *local,
                            const uint64_t *remote, const uint64_t *len, uint64_t n,
                            int max_threads, const uint64_t *windows, uint64_t nwin,
                            uint64_t *bytes_done_p);

/* Copies piece i, len[i] bytes, from src[i] to dst[i] within this process (memcpy), for n pieces;
 * pieces of length 0 are skipped and n == 0 is a no-op. Split across up to max_threads threads like
 * dxl_cma_transfer; max_threads <= 1 copies on the calling thread only. Arrays as for
 * dxl_cma_transfer; the caller guarantees all ranges are mapped (a bad address crashes, as memcpy
 * does) and that pieces do not overlap. DXL_E_INVAL for NULL arrays with n > 0 or wrapping
 * ranges. */
int dxl_copy_pieces(const uint64_t *dst, const uint64_t *src, const uint64_t *len, uint64_t n,
                    int max_threads);

/* Sets the split threshold, the fewest bytes worth giving one extra thread, and returns the
 * previous value; 0 only reads it. A transfer of T bytes uses min(max_threads, T / threshold)
 * threads (at least 1). Process-wide; meant for tuning and benchmarks
 * (benchmarks/native_cma_threads.py). */
uint64_t dxl_split_threshold(uint64_t min_bytes_per_thread);

/* 0 (DXL_OK) if process_vm_readv works on our own pid, else the mapped DXL_E_* code. This probes
 * the syscall itself (seccomp filters, kernels built without CMA); whether the ptrace policy lets
 * us reach another process shows only with a transfer to that process. */
int dxl_cma_self_test(void);

/* ---- local memory --------------------------------------------------------------------------- */

/* DXL_OK if the byte at each of the n addresses addr[i] is mapped and readable in this process,
 * else DXL_E_FAULT (dxl_last_errno() EFAULT). Asks the kernel (process_vm_readv on ourselves, or a
 * pipe where that is filtered out), so a bad address fails instead of crashing. addr is a
 * caller-owned array of n entries, read during the call only; NULL with n > 0 is DXL_E_INVAL.
 * Used to refuse registering memory a peer must never be sent to. */
int dxl_check_readable(const uint64_t *addr, uint64_t n);

/* Moves the whole pages [addr, addr + len) of this process (page aligned, len > 0) onto a new
 * memfd, in place: same addresses, same bytes, same protection (read + write), but now backed by
 * shared memory that a same-host peer can map (through /proc/<pid>/fd/<fd>), so its transfers
 * become a memcpy. The range must be private anonymous read-write memory (or memory this function
 * moved before) that no device or NIC has pinned (CUDA host-registered, RDMA-registered memory):
 * those would keep using the old pages. Works chunk by chunk (chunk bytes, a multiple of the page
 * size; 0 picks 32 MiB), so it needs only one chunk of extra memory; all-zero chunks stay holes of
 * the memfd. Each chunk is write-protected with userfaultfd while it moves: another thread that
 * writes to it meanwhile waits in the kernel and its write lands on the new page (a system call
 * writing into it fails with EFAULT where only user-mode faults can be handled), so no write is
 * lost. The memfd is sealed against shrinking and growing. On success *fd_p receives the memfd
 * (close-on-exec; the caller owns it and releases it with dxl_share_release()). On failure
 * nothing stays shared (chunks already moved are private again, same bytes), no fd is returned,
 * and: DXL_E_INVAL (bad alignment or size), DXL_E_UNSUPPORTED (no userfaultfd write protection
 * on this kernel or for this memory: nothing was moved), DXL_E_NOMEM, DXL_E_IO. */
int dxl_share_in_place(uint64_t addr, uint64_t len, uint64_t chunk, int *fd_p);

/* Makes [addr, addr + len), which dxl_share_in_place() moved onto the memfd fd (from offset 0),
 * private again: a private mapping of the same memfd, so every byte written so far stays, later
 * writes copy the page (fork() copies it; peers that still map the memfd no longer see it). The
 * caller then closes fd. DXL_E_INVAL, or the mapped mmap error. */
int dxl_share_release(uint64_t addr, uint64_t len, int fd);

/* Faults the pages of [addr, addr + len) (page aligned) into this process's page tables,
 * writable, without touching their bytes: madvise(MADV_POPULATE_WRITE), or on kernels without it
 * a read per page (enough for shared mappings). Meant for our mapping of a peer's memfd: the first
 * copy through a fresh mapping otherwise pays a page fault per 4 KiB page (4-5x slower). The
 * caller keeps the range mapped during the call. DXL_E_INVAL (alignment, empty, wrap), or the
 * mapped madvise error (DXL_E_NOMEM: not mapped; DXL_E_FAULT). */
int dxl_prefault(uint64_t addr, uint64_t len);

/* ---- debug and leak counters ----------------------------------------------------------------- */

typedef struct {
    uint64_t regions_live;     /**< regions in live registries, over all registries */
    uint64_t peers_open;       /**< dxl_peer_t handles not yet closed */
    uint64_t ops_inflight;     /**< dxl_cma_transfer / dxl_copy_pieces calls running now */
    uint64_t bytes_registered; /**< sum of the lengths of those regions */
    uint64_t ops_split;        /**< calls that ran on more than one thread (monotonic) */
    uint64_t registries_live;  /**< dxl_registry_t handles not yet freed */
} dxl_counters_t;

/* Fills *out_p (caller-owned, not NULL) with a snapshot of the counters; each field is read
 * atomically, the set is not one atomic snapshot. */
void dxl_counters(dxl_counters_t *out_p);

/* ================================================================================================
 * tcp transport (native/dxl_tcp_wire.c, dxl_tcp_server.c, dxl_tcp_client.c)
 *
 * Moves piece lists between engines on different hosts over TCP. Python opens, authenticates and
 * owns the sockets (dxl/tcp.py, dxl/auth.py); this layer only moves request frames and bytes.
 *
 * Wire format (all integers little-endian). A request is
 *     header  (DXL_TCP_HDR_BYTES = 32): u32 magic DXL_TCP_REQ_MAGIC, u16 version DXL_TCP_VERSION,
 *             u16 op (DXL_TCP_OP_READ: the client pulls from the server's memory;
 *             DXL_TCP_OP_WRITE: the client pushes into it), u64 request id, u64 piece count n
 *             (<= DXL_TCP_MAX_PIECES), u64 total bytes
 *     table   n x (u64 addr, u64 len): ranges in the server's memory, each len at most
 *             DXL_TCP_MAX_PIECE_LEN, addr + len not wrapping, the lens summing exactly to total
 *     payload (WRITE only) total bytes, piece after piece in table order.
 * The reply is
 *     header  (32): u32 magic DXL_TCP_REP_MAGIC, u16 version, u16 op (echoed), u64 request id
 *             (echoed), i32 status (DXL_OK or a negative DXL_E_* code), u32 detail (for
 *             DXL_E_RANGE the index of the first refused piece, else 0), u64 total (bytes that
 *             follow for a READ, bytes stored for a WRITE; 0 on error)
 *     data    (READ with status DXL_OK only) total bytes, in table order.
 * A well-formed request that the registry refuses (DXL_E_RANGE) gets an error reply and the
 * connection stays usable (a refused WRITE's payload is read and discarded first). A malformed one
 * (bad magic or version, unknown op, too many pieces, a piece too long or wrapping, lens that do
 * not sum to total: DXL_E_PROTO or DXL_E_UNSUPPORTED) gets an error reply, then that connection,
 * and only that one, is closed.
 * ============================================================================================== */

#define DXL_E_TIMEDOUT -11 /* the call's timeout expired before the transfer finished */
#define DXL_E_PEER -12     /* the peer closed or reset the connection (EOF, ECONNRESET, EPIPE...) */
#define DXL_E_PROTO -13    /* a malformed frame: bad magic/version, wrong id or byte count */
#define DXL_E_REMOTE -14   /* the peer's data server refused the request (its status: result) */
#define DXL_E_LIMIT -15    /* a data server's limit on connections was reached (adopt refused) */

#define DXL_TCP_VERSION 1
#define DXL_TCP_REQ_MAGIC 0x51545844 /* "DXTQ" as little-endian bytes */
#define DXL_TCP_REP_MAGIC 0x52545844 /* "DXTR" */
#define DXL_TCP_OP_READ 1
#define DXL_TCP_OP_WRITE 2
#define DXL_TCP_HDR_BYTES 32
/* Most table entries in one request; dxl_tcp_transfer sends longer lists as several requests. */
#define DXL_TCP_MAX_PIECES 65536
/* Longest table entry (1 GiB); dxl_tcp_transfer cuts longer pieces into several entries. */
#define DXL_TCP_MAX_PIECE_LEN 1073741824
/* Most streams one dxl_tcp_transfer call takes. */
#define DXL_TCP_MAX_STREAMS 64
/* Most threads of one data server. */
#define DXL_TCP_MAX_THREADS 16
/* Most connections one data server holds at once (dxl_tcp_server_adopt refuses more). */
#define DXL_TCP_MAX_CONNS 1024
/* Most connections with the same tag one data server holds at once (the engine: per link key). */
#define DXL_TCP_MAX_CONNS_PER_TAG 64
/* Most bytes of request-table buffers a connection keeps after a request: a larger request's
 * buffers (up to ~2 MiB for DXL_TCP_MAX_PIECES entries) are freed when it ends. */
#define DXL_TCP_CONN_BUF_KEEP 262144

/* ---- data server ---- */

/* A data server: threads, each with an epoll set, serving connections handed over with
 * dxl_tcp_server_adopt(). Every request is checked against the one region registry the server was
 * started with (dxl_region_check_pieces) before any memory is touched; only memory registered
 * there is ever read or written, never that of another registry of the process. Sockets are
 * non-blocking with one state machine per connection, so a slow or stalled client delays no other
 * connection. */
typedef struct dxl_tcp_server dxl_tcp_server_t;

typedef struct {
    uint64_t conns_adopted;     /**< connections handed over (monotonic) */
    uint64_t conns_live;        /**< connections open now */
    uint64_t conns_dropped;     /**< closed for a malformed request, I/O error or EOF mid-frame */
    uint64_t requests_served;   /**< requests answered with DXL_OK (monotonic) */
    uint64_t requests_rejected; /**< requests answered with an error status (monotonic) */
    uint64_t bytes_sent;        /**< data bytes served to READ requests (monotonic) */
    uint64_t bytes_received;    /**< data bytes stored by WRITE requests (monotonic) */
    uint64_t requests_aborted;  /**< requests cut off by dxl_tcp_server_fence's timeout */
    uint64_t conns_revoked;     /**< closed because dxl_tcp_server_revoke named their tag */
    uint64_t conns_refused;     /**< adoptions refused with DXL_E_LIMIT (monotonic) */
    uint64_t buffer_bytes;      /**< bytes of request-table buffers held by connections now:
                                     ~2 KiB per idle connection, more only while a request with
                                     a larger table runs (at most DXL_TCP_CONN_BUF_KEEP kept
                                     after it) */
} dxl_tcp_server_stats_t;

/* Starts a data server with `threads` threads (1..DXL_TCP_MAX_THREADS, else DXL_E_INVAL) that
 * serves the memory of `registry` (not NULL, else DXL_E_INVAL). The server keeps the registry
 * pointer without owning it: the caller keeps the registry alive until dxl_tcp_server_stop() has
 * returned, and may add and remove regions meanwhile. On success *server_p receives a handle the
 * caller owns and must release with dxl_tcp_server_stop(). The threads block all signals. */
int dxl_tcp_server_start(int threads, dxl_registry_t *registry, dxl_tcp_server_t **server_p);

/* Hands a connected, already authenticated stream socket to the server, which makes it
 * non-blocking and serves requests on it until the peer closes it, it breaks, it is revoked, or
 * the server stops. `tag` is any value the caller groups connections by (the engine: which link
 * key the client authenticated with), for dxl_tcp_server_revoke() and the per-tag limit.
 * Ownership: on DXL_OK the server owns fd and closes it; the caller must not use or close it
 * again. On failure the caller still owns fd (its flags as they were). DXL_E_INVAL: NULL server,
 * fd < 0, or the server is stopping; DXL_E_LIMIT: the server already holds DXL_TCP_MAX_CONNS
 * connections, or DXL_TCP_MAX_CONNS_PER_TAG with this tag (revoked ones count until closed;
 * counted in conns_refused; the connections it holds are served as before); DXL_E_NOMEM;
 * DXL_E_IO (fcntl or epoll_ctl failed, errno saved). */
int dxl_tcp_server_adopt(dxl_tcp_server_t *server, int fd, uint64_t tag);

/* Revokes every connection adopted with `tag` and still open: none of them starts another
 * request once this returns (a request starts when its whole table has been read: from then on
 * it is checked against the registry and may touch memory), and each is closed, so its client
 * sees DXL_E_PEER (a request whose table completes after this call gets no reply). What is
 * guaranteed:
 * - no request on them touches memory unless it started before this returned;
 * - one that did start (at most one per connection) may run its memory access to the end (its
 *   reply may or may not be sent) and its connection is closed right after; the memory stays
 *   registered through a revoke, so this is safe. To stop touching memory that is about to be
 *   freed, remove its regions and call dxl_tcp_server_fence();
 * - the others (idle, or mid-frame without touching memory) are closed by their threads at once,
 *   after this returns (it does not wait for the closes; conns_live shows them);
 * - connections adopted with `tag` after this returns are not affected (the caller refuses those:
 *   an adoption is wholly before or wholly after a revoke).
 * Does not block on connections. If closed_p is not NULL it receives how many connections were
 * revoked by this call. DXL_OK, or DXL_E_INVAL for a NULL server. */
int dxl_tcp_server_revoke(dxl_tcp_server_t *server, uint64_t tag, uint64_t *closed_p);

/* Waits until no request that was touching memory when this call began still does, so that
 * memory unregistered (dxl_region_remove) before this call may be freed once it returns: later
 * requests are checked against the registry as it is now. Requests still running after
 * timeout_ms (< 0: no limit) have their connections closed (their clients see DXL_E_PEER); the
 * call waits for that, which takes at most one non-blocking syscall per connection. If aborted_p
 * is not NULL it receives how many were closed. DXL_OK, or DXL_E_INVAL for a NULL server. */
int dxl_tcp_server_fence(dxl_tcp_server_t *server, int timeout_ms, uint64_t *aborted_p);

/* Fills *out_p (caller-owned, not NULL) with the server's counters; each field is read
 * atomically, the set is not one snapshot. NULL server: all zero. */
void dxl_tcp_server_stats(const dxl_tcp_server_t *server, dxl_tcp_server_stats_t *out_p);

/* Stops the threads (joined before it returns), closes every adopted connection and frees the
 * server; NULL is a no-op. The caller must not use the handle afterwards, nor call this while
 * another call on the same server is running. */
void dxl_tcp_server_stop(dxl_tcp_server_t *server);

/* Data servers started and not yet stopped, process-wide (a leak counter for tests). */
uint64_t dxl_tcp_servers_live(void);

/* ---- client ---- */

typedef struct {
    uint64_t bytes_done;    /**< data bytes moved (received into local memory for a READ,
                                 confirmed stored by the server for a WRITE) */
    uint64_t broken_mask;   /**< bit i set: fds[i] was left in the middle of a frame (failure,
                                 timeout, or stopped because another stream failed) and must be
                                 closed and reconnected, never reused */
    int streams_used;       /**< fds[0 .. streams_used) carried requests */
    int remote_status;      /**< on DXL_E_REMOTE: the server's status (a DXL_E_* code), else 0 */
    uint32_t remote_detail; /**< on DXL_E_REMOTE: the server's detail field */
} dxl_tcp_result_t;

/* Moves n pieces between this process and a peer's data server over nfds (1..DXL_TCP_MAX_STREAMS)
 * connected, authenticated stream sockets to that server: write = 0 is a READ (remote -> local, a
 * pull), write = 1 a WRITE (local -> remote, a push). Piece i is len[i] bytes at local[i] here and
 * remote[i] in the peer; pieces of length 0 are skipped and n == 0 is a no-op. fds, local, remote
 * and len are caller-owned arrays read during the call only; the caller keeps owning the sockets.
 * A blocking socket waits inside each syscall for at most 50 ms at a time (SO_RCVTIMEO and
 * SO_SNDTIMEO, restored before the call returns); a non-blocking one waits in poll.
 *
 * A call of T bytes uses k = min(nfds, T / dxl_tcp_stream_threshold()) streams (at least 1),
 * fds[0 .. k): the byte range is cut into k contiguous parts of roughly equal bytes, each moved on
 * its own stream as requests of at most DXL_TCP_MAX_PIECES entries. The calling thread moves the
 * first part and workers of the pool that dxl_cma_transfer uses (at most DXL_MAX_THREADS - 1)
 * move the others in parallel; parts no worker is free to take the calling thread moves itself,
 * one after another. Replies scatter straight into local memory and writes gather
 * straight from it (readv/writev-style, up to DXL_IOV_MAX entries per syscall, partial returns
 * resumed at the exact byte). Each reply's magic, version, op, request id, status and byte count
 * are checked.
 *
 * timeout_ms (> 0, or < 0 for no limit; 0 is DXL_E_INVAL) bounds the whole call. Errors:
 * DXL_E_INVAL (bad arguments, ranges that wrap), DXL_E_TIMEDOUT, DXL_E_PEER (EOF, reset, broken
 * pipe; errno saved), DXL_E_PROTO (a reply that does not match its request), DXL_E_REMOTE (the
 * server refused: result_p->remote_status says why), DXL_E_FAULT (a local range is not mapped),
 * DXL_E_NOMEM, DXL_E_IO. The first failure stops the other streams. On failure the destination may
 * hold any mix of old and new bytes, and every stream in broken_mask must be closed. The other
 * streams are at a frame boundary and may be reused: they finished their requests, or got a
 * refusal of a well-formed request (DXL_E_REMOTE with remote_status DXL_E_RANGE), after which the
 * server keeps the connection.
 *
 * result_p (not NULL, caller-owned) is written on success and failure alike. While the call runs
 * it counts in dxl_counters_t.ops_inflight. */
int dxl_tcp_transfer(const int *fds, int nfds, int write, const uint64_t *local,
                     const uint64_t *remote, const uint64_t *len, uint64_t n, int timeout_ms,
                     dxl_tcp_result_t *result_p);

/* Sets the fewest bytes worth one more stream in dxl_tcp_transfer (default 4 MiB) and returns
 * the previous value; 0 only reads it. Process-wide; for tuning and benchmarks. */
uint64_t dxl_tcp_stream_threshold(uint64_t min_bytes_per_stream);
