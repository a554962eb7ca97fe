/* The master's HTTP endpoints on libmicrohttpd's thread (via
 * metadata/http.h): GET /metrics (Prometheus text 0.0.4), GET /health
 * ("ok"), and the embedded Mooncake metadata service at /metadata. Reads
 * master state under the master lock. With a secret, /metadata and writes
 * require "Authorization: Bearer <secret>" (see kvs_master_web_start). */
#ifndef KVS_MASTER_WEB_H
#define KVS_MASTER_WEB_H

#include <stddef.h>
#include <stdint.h>

#include "master/master.h"
#include "metadata/http.h"

typedef struct kvs_master_web kvs_master_web;

/* Starts serving on `addr` ("host:port"; port 0 picks one, written to
 * *port). with_metadata: also serve /metadata from an in-memory store owned
 * by the returned object. secret: the configured secret (NULL/"" = none).
 * With a secret, /metadata (every method) and every request other than
 * GET/HEAD need "Authorization: Bearer <secret>" (401 without the header,
 * 403 with wrong credentials); on an address beyond loopback, /metrics and
 * /stats need it too (/health never does). KVS_OK and *out, or
 * KVS_ERR_CONFIG (bad address, or beyond loopback without a secret),
 * KVS_ERR_IO (cannot listen), KVS_ERR_NOMEM; a message goes to err. */
int kvs_master_web_start(kvs_master *m, const char *addr, int with_metadata,
                         const char *secret, uint16_t *port, kvs_master_web **out, char *err,
                         size_t errlen);

/* Stops the server, frees the metadata store. Safe with NULL. */
void kvs_master_web_stop(kvs_master_web *w);

/* Routes one request (exposed for tests; the HTTP thread calls it). */
void kvs_master_web_route(kvs_master_web *w, const kvs_http_request *req,
                          kvs_http_response *resp);

#endif
