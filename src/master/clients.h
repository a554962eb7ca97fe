/* Client registry: clients that said HELLO, with their identity and the
 * time they were last heard from. Owns its records. Not thread-safe. */
#ifndef KVS_MASTER_CLIENTS_H
#define KVS_MASTER_CLIENTS_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvs_mclient {
    struct kvs_mclient *hnext;
    uint64_t id;
    char hostname[256];
    uint8_t host_id[16];
    uint64_t pid;
    uint32_t uid;
    uint32_t role;
    uint64_t last_seen_ms;
    uint64_t disconnected_ms; /* its connection closed at this time; 0 = connected */
} kvs_mclient;

typedef struct kvs_clients {
    kvs_mclient **buckets;
    size_t mask;
    size_t count, max;
    size_t ndisconnected; /* clients with disconnected_ms != 0 */
    uint64_t next_id;
} kvs_clients;

/* Initializes an empty registry admitting at most `max` clients; ids start
 * at first_id (non-zero). KVS_OK or KVS_ERR_NOMEM. */
int kvs_clients_init(kvs_clients *C, size_t max, uint64_t first_id);

/* Frees every record and the table. */
void kvs_clients_destroy(kvs_clients *C);

/* Registers a new client (fields copied) seen at now_ms. Returns the record
 * or NULL with *err = KVS_ERR_BUSY (full) or KVS_ERR_NOMEM. */
kvs_mclient *kvs_clients_add(kvs_clients *C, const char *hostname, const uint8_t host_id[16],
                             uint64_t pid, uint32_t uid, uint32_t role, uint64_t now_ms,
                             int *err);

/* Finds a client by id, or NULL. */
kvs_mclient *kvs_clients_find(const kvs_clients *C, uint64_t id);

/* Unregisters and frees c. */
void kvs_clients_remove(kvs_clients *C, kvs_mclient *c);

/* Returns one client last seen before `deadline_ms` (for expiry), or NULL. */
kvs_mclient *kvs_clients_find_stale(const kvs_clients *C, uint64_t deadline_ms);

/* Marks c as disconnected since now_ms (its connection closed); now_ms 0
 * clears the mark. */
void kvs_clients_set_disconnected(kvs_clients *C, kvs_mclient *c, uint64_t now_ms);

/* Returns one client disconnected at or before `deadline_ms`, or NULL.
 * Costs nothing while no client is disconnected. */
kvs_mclient *kvs_clients_find_disconnected(const kvs_clients *C, uint64_t deadline_ms);

/* Calls fn on every client (fn must not add or remove clients). */
void kvs_clients_foreach(const kvs_clients *C, void (*fn)(kvs_mclient *c, void *ud), void *ud);

#endif
