/* Internal extensions of the client API for kvshelf's own tools (node,
 * status, stop, put/get/rm) and the master's embedded pool. Not installed. */
#ifndef KVS_CLIENT_EXT_H
#define KVS_CLIENT_EXT_H

#include <stddef.h>
#include <stdint.h>

#include "kvshelf/client.h"
#include "proto/proto.h" /* enum kvs_role */

typedef struct kvs_client_opts {
    uint32_t role;  /* enum kvs_role; 0 = KVS_ROLE_CLIENT */
    int no_segment; /* contribute no segment even if global_segment_size > 0 */
    int no_spawn;   /* embedded mode: if no pool runs, fail (KVS_ERR_UNAVAILABLE)
                       instead of starting one */
} kvs_client_opts;

/* kvs_client_open with options (opts may be NULL = defaults). With no_spawn
 * and no running embedded pool, returns KVS_ERR_UNAVAILABLE and a message
 * naming the runtime directory. */
int kvs_client_open_opts(const kvs_config *cfg, const kvs_client_opts *opts, kvs_client **out,
                         char *err, size_t errlen);

/* Asks the master to stop (SHUTDOWN). KVS_OK, KVS_ERR_AUTH if refused, or a
 * transport error. */
int kvs_client_shutdown_master(kvs_client *c);

/* The master address this client uses ("unix:/run/user/1000/kvshelf/master.sock"). */
const char *kvs_client_master_addr(const kvs_client *c);

/* 1 if the client uses the embedded host-local pool. */
int kvs_client_is_embedded(const kvs_client *c);

/* Transfer address of this client's own segment ("" if it has none) and its
 * current segment id (0 while not mounted). */
const char *kvs_client_transfer_addr(const kvs_client *c);
uint32_t kvs_client_segment_id(kvs_client *c);

/* The runtime directory the embedded pool of `cfg` uses (resolved like
 * kvs_client_open does: cfg->runtime_dir, else $XDG_RUNTIME_DIR/kvshelf,
 * else /tmp/kvshelf-<uid>), without creating it. */
void kvs_embedded_runtime_dir(const kvs_config *cfg, char *out, size_t cap);

/* Random bytes of a pool secret (written as twice as many hex digits). */
#define KVS_POOL_SECRET_BYTES 32

/* The pool secret of this user on this host, used by the daemons and
 * clients that have no configured secret: the hex text kept in
 * <runtime dir of cfg>/secret (the directory is created 0700 if missing and
 * refused if owned by another uid or writable by group/others, as for the
 * embedded pool). The first process to need it creates the file (mode 0600,
 * O_EXCL, from random bytes; whole or not at all); every later one reads it.
 * `out` gets 2 * KVS_POOL_SECRET_BYTES hex digits and a NUL (cap must be
 * larger). KVS_OK, or KVS_ERR_CONFIG (bad directory or file), KVS_ERR_IO,
 * KVS_ERR_INVALID, with a message in err. */
int kvs_pool_secret(const kvs_config *cfg, char *out, size_t cap, char *err, size_t errlen);

#endif
