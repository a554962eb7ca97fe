/* Mooncake-compatible metadata service: an in-memory key -> JSON value store
 * behind `GET|PUT|DELETE <url>?key=K` (404 for a missing key, 400 for a
 * request without key or with a body that is not valid JSON on PUT).
 * Thread-safe. */
#ifndef KVS_METADATA_H
#define KVS_METADATA_H

#include "metadata/http.h"

typedef struct kvs_metadata kvs_metadata;

/* Creates an empty store; NULL on out of memory. */
kvs_metadata *kvs_metadata_new(void);
void kvs_metadata_free(kvs_metadata *m);

/* Serves one HTTP request addressed to the metadata URL (the caller routes
 * by path). Fills `resp` (body malloc'd). */
void kvs_metadata_handle(kvs_metadata *m, const kvs_http_request *req, kvs_http_response *resp);

/* Number of keys stored (for metrics). */
size_t kvs_metadata_count(kvs_metadata *m);

#endif
