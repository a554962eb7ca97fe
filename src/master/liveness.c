/* Prompt expiry of clients whose connection closed (see
 * kvs_master_client_disconnected in master.h). */
#include "common/log.h"
#include "common/util.h"
#include "master/master_int.h"

#define DEFAULT_DISCONNECT_GRACE_MS 1000u

void kvs_master_client_disconnected(kvs_master *m, uint64_t client_id)
{
    kvs_mclient *c = kvs_clients_find(&m->clients, client_id);
    if (c) kvs_clients_set_disconnected(&m->clients, c, kvs_master_now(m));
}

/* The grace in force: the option (default 1 s), never beyond the TTL. */
static uint64_t grace_ms(const kvs_master *m)
{
    uint32_t g = m->o.disconnect_grace_ms ? m->o.disconnect_grace_ms : DEFAULT_DISCONNECT_GRACE_MS;
    return KVS_MIN(g, m->o.client_ttl_ms);
}

void kvs_m_expire_disconnected(kvs_master *m, uint64_t now)
{
    uint64_t g = grace_ms(m);
    if (now < g) return;
    kvs_mclient *c;
    while ((c = kvs_clients_find_disconnected(&m->clients, now - g)) != NULL) {
        if (c->last_seen_ms > c->disconnected_ms) {
            /* a request on another connection named it: alive, TTL rules */
            kvs_clients_set_disconnected(&m->clients, c, 0);
            continue;
        }
        KVS_LOGI("client %llu (%s pid %llu) expired: its connection closed %llu ms ago",
                 (unsigned long long)c->id, c->hostname, (unsigned long long)c->pid,
                 (unsigned long long)(now - c->disconnected_ms));
        m->cnt.disconnected_clients++;
        kvs_m_client_expire(m, c);
    }
}
