/* kvs_strerror / kvs_errname. */
#include "kvshelf/errors.h"

#include <stddef.h>

struct err_desc {
    int code;
    const char *name;
    const char *text;
};

static const struct err_desc table[] = {
    {KVS_OK, "KVS_OK", "success"},
    {KVS_ERR_INVALID, "KVS_ERR_INVALID", "invalid argument"},
    {KVS_ERR_NOMEM, "KVS_ERR_NOMEM", "out of memory"},
    {KVS_ERR_NOT_FOUND, "KVS_ERR_NOT_FOUND", "key not found"},
    {KVS_ERR_EXISTS, "KVS_ERR_EXISTS", "key already exists"},
    {KVS_ERR_NO_SPACE, "KVS_ERR_NO_SPACE", "no space left in the pool"},
    {KVS_ERR_TOO_LARGE, "KVS_ERR_TOO_LARGE", "value too large"},
    {KVS_ERR_TIMEOUT, "KVS_ERR_TIMEOUT", "timed out"},
    {KVS_ERR_CONN, "KVS_ERR_CONN", "connection failed or lost"},
    {KVS_ERR_PROTO, "KVS_ERR_PROTO", "protocol error (malformed frame)"},
    {KVS_ERR_AUTH, "KVS_ERR_AUTH", "authentication failed (wrong or missing secret)"},
    {KVS_ERR_CONFIG, "KVS_ERR_CONFIG", "invalid configuration"},
    {KVS_ERR_NOT_REGISTERED, "KVS_ERR_NOT_REGISTERED", "buffer is not in registered memory"},
    {KVS_ERR_IO, "KVS_ERR_IO", "system I/O error"},
    {KVS_ERR_CLOSED, "KVS_ERR_CLOSED", "closed"},
    {KVS_ERR_BUSY, "KVS_ERR_BUSY", "busy: queue full"},
    {KVS_ERR_CORRUPT, "KVS_ERR_CORRUPT", "stored object failed its integrity check"},
    {KVS_ERR_UNAVAILABLE, "KVS_ERR_UNAVAILABLE", "segment unavailable"},
    {KVS_ERR_UNSUPPORTED, "KVS_ERR_UNSUPPORTED", "not supported"},
    {KVS_ERR_INTERNAL, "KVS_ERR_INTERNAL", "internal error"},
    {KVS_ERR_CUDA, "KVS_ERR_CUDA", "CUDA error"},
    {KVS_ERR_LAYOUT, "KVS_ERR_LAYOUT", "no KV layout registered or block id out of range"},
    {KVS_ERR_EARLY, "KVS_ERR_EARLY", "GPU gate opened before the task finished: redo the work after it"},
};

static const struct err_desc *find(int err)
{
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (table[i].code == err) return &table[i];
    return NULL;
}

const char *kvs_strerror(int err)
{
    const struct err_desc *d = find(err);
    return d ? d->text : "unknown error";
}

const char *kvs_errname(int err)
{
    const struct err_desc *d = find(err);
    return d ? d->name : "KVS_ERR_UNKNOWN";
}
