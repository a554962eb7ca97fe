/* kvshelf — error codes.
 *
 * Every kvshelf function that can fail returns an int: 0 (KVS_OK) or more on
 * success, one of the negative codes below on failure. kvs_strerror() turns a
 * code into a short, static, human-readable string.
 */
#ifndef KVSHELF_ERRORS_H
#define KVSHELF_ERRORS_H

#ifdef __cplusplus
extern "C" {
#endif

enum kvs_error {
    KVS_OK = 0,
    KVS_ERR_INVALID = -1,        /* an argument is invalid (NULL, zero length, out of range) */
    KVS_ERR_NOMEM = -2,          /* out of process memory */
    KVS_ERR_NOT_FOUND = -3,      /* the key is not in the pool: a miss */
    KVS_ERR_EXISTS = -4,         /* the key is already stored or being written */
    KVS_ERR_NO_SPACE = -5,       /* the pool is full and nothing can be evicted */
    KVS_ERR_TOO_LARGE = -6,      /* value larger than the limit or than the caller's buffer */
    KVS_ERR_TIMEOUT = -7,        /* the operation did not finish in time */
    KVS_ERR_CONN = -8,           /* cannot reach the master or a peer (connection refused/lost) */
    KVS_ERR_PROTO = -9,          /* a malformed or unexpected frame was received */
    KVS_ERR_AUTH = -10,          /* wrong or missing shared secret */
    KVS_ERR_CONFIG = -11,        /* invalid configuration (unknown key, bad value) */
    KVS_ERR_NOT_REGISTERED = -12,/* buffer is not inside memory registered with the client */
    KVS_ERR_IO = -13,            /* a system call failed (see errno in the log) */
    KVS_ERR_CLOSED = -14,        /* the client/connector is closing or closed */
    KVS_ERR_BUSY = -15,          /* a queue is full (backpressure); try again later */
    KVS_ERR_CORRUPT = -16,       /* a stored object failed its header/length check */
    KVS_ERR_UNAVAILABLE = -17,   /* the segment holding the object is gone or unreachable */
    KVS_ERR_UNSUPPORTED = -18,   /* not supported by this build or configuration */
    KVS_ERR_INTERNAL = -19,      /* an internal invariant failed (a bug: please report) */
    KVS_ERR_CUDA = -20,          /* a CUDA call failed */
    KVS_ERR_LAYOUT = -21,        /* no KV layout registered, or block id out of range */
    KVS_ERR_EARLY = -22,         /* a GPU gate opened before its load finished (see
                                    kvs_task_gpu_wait): work queued after it may have read
                                    incomplete data; redo it */
};

/* Returns a static string describing `err` (never NULL; unknown codes give
 * "unknown error"). Thread-safe. */
const char *kvs_strerror(int err);

/* Returns the symbolic name of `err`, e.g. "KVS_ERR_NOT_FOUND" (static, never NULL). */
const char *kvs_errname(int err);

#ifdef __cplusplus
}
#endif
#endif
