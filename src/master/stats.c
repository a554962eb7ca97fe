/* Reports: the STATS JSON document and the Prometheus /metrics text. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "master/master_int.h"

static uint64_t uptime_ms(const kvs_master *m)
{
    uint64_t n = kvs_now_ms();
    return n > m->start_ms ? n - m->start_ms : 0;
}

typedef struct totals {
    uint64_t capacity, used;
} totals;

static totals pool_totals(const kvs_master *m)
{
    totals t = {0, 0};
    for (size_t i = 0; i < m->segs.n; i++) {
        kvs_alloc_stats st;
        kvs_alloc_get_stats(m->segs.v[i]->alloc, &st);
        t.capacity += st.capacity;
        t.used += st.used;
    }
    return t;
}

typedef struct client_ctx {
    cJSON *arr;
    uint64_t now;
    int fail;
} client_ctx;

static void add_client(kvs_mclient *c, void *ud)
{
    client_ctx *x = ud;
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddItemToArray(x->arr, o)) {
        cJSON_Delete(o);
        x->fail = 1;
        return;
    }
    cJSON_AddNumberToObject(o, "id", (double)c->id);
    cJSON_AddStringToObject(o, "hostname", c->hostname);
    cJSON_AddNumberToObject(o, "pid", (double)c->pid);
    cJSON_AddNumberToObject(o, "uid", (double)c->uid);
    cJSON_AddStringToObject(o, "role",
                            c->role == 1 ? "client" : c->role == 2 ? "node" : "tool");
    cJSON_AddNumberToObject(o, "last_seen_ms_ago",
                            (double)(x->now > c->last_seen_ms ? x->now - c->last_seen_ms : 0));
}

char *kvs_master_stats_json(kvs_master *m)
{
    uint64_t now = kvs_master_now(m);
    totals t = pool_totals(m);
    cJSON *root = cJSON_CreateObject();
    if (!root) return NULL;
    cJSON_AddNumberToObject(root, "uptime_s", (double)uptime_ms(m) / 1000.0);
    cJSON_AddNumberToObject(root, "capacity", (double)t.capacity);
    cJSON_AddNumberToObject(root, "used", (double)t.used);
    cJSON_AddNumberToObject(root, "objects", (double)m->n_complete);
    cJSON_AddNumberToObject(root, "writing", (double)(m->ix.count - m->n_complete - m->n_unlisting));
    cJSON_AddNumberToObject(root, "leases", (double)m->leases.count);
    cJSON_AddNumberToObject(root, "lease_ms", (double)m->o.lease_ms);
    cJSON_AddNumberToObject(root, "client_ttl_ms", (double)m->o.client_ttl_ms);
    cJSON *segs = cJSON_AddArrayToObject(root, "segments");
    for (size_t i = 0; segs && i < m->segs.n; i++) {
        const kvs_seg *s = m->segs.v[i];
        kvs_alloc_stats st;
        kvs_alloc_get_stats(s->alloc, &st);
        cJSON *o = cJSON_CreateObject();
        if (!o || !cJSON_AddItemToArray(segs, o)) {
            cJSON_Delete(o);
            break;
        }
        cJSON_AddNumberToObject(o, "id", s->id);
        cJSON_AddNumberToObject(o, "size", (double)s->size);
        cJSON_AddNumberToObject(o, "used", (double)st.used);
        cJSON_AddNumberToObject(o, "objects", (double)s->nobjs);
        cJSON_AddNumberToObject(o, "largest_free", (double)st.largest_free);
        cJSON_AddNumberToObject(o, "free_extents", (double)st.free_extents);
        cJSON_AddNumberToObject(o, "owner_client", (double)s->owner);
        cJSON_AddStringToObject(o, "hostname", s->hostname);
        cJSON_AddStringToObject(o, "shm_name", s->shm_name);
        cJSON_AddStringToObject(o, "transfer_addr", s->transfer_addr);
        if (s->has_dir) {
            cJSON *d = cJSON_AddObjectToObject(o, "directory");
            if (d) {
                cJSON_AddBoolToObject(d, "collected", s->dir_collected);
                cJSON_AddNumberToObject(d, "recovered", (double)s->dir_loaded);
                cJSON_AddNumberToObject(d, "refused", (double)s->dir_rejected);
                cJSON_AddNumberToObject(d, "pending_changes", (double)(s->n_dir_q + s->n_dir_sent));
                cJSON_AddNumberToObject(d, "unlisting_bytes", (double)s->unlist_bytes);
            }
        }
    }
    kvs_master_recovery rv;
    kvs_master_get_recovery(m, &rv);
    cJSON *rj = cJSON_AddObjectToObject(root, "recovery");
    if (rj) {
        cJSON_AddStringToObject(rj, "state", rv.complete ? "complete" : "collecting");
        cJSON_AddBoolToObject(rj, "complete", rv.complete);
        cJSON_AddNumberToObject(rj, "segments_collected", (double)rv.segments_collected);
        cJSON_AddNumberToObject(rj, "segments_pending", (double)rv.segments_pending);
        cJSON_AddNumberToObject(rj, "objects_recovered", (double)rv.objects_recovered);
        cJSON_AddNumberToObject(rj, "entries_refused", (double)rv.entries_rejected);
        cJSON_AddNumberToObject(rj, "complete_after_ms", (double)rv.complete_after_ms);
        cJSON_AddNumberToObject(rj, "wait_ms", (double)m->o.recovery_wait_ms);
    }
    client_ctx cx = {cJSON_AddArrayToObject(root, "clients"), now, 0};
    if (cx.arr) kvs_clients_foreach(&m->clients, add_client, &cx);
    cJSON *c = cJSON_AddObjectToObject(root, "counters");
    if (c) {
        const kvs_master_counters *k = &m->cnt;
        cJSON_AddNumberToObject(c, "puts", (double)k->puts);
        cJSON_AddNumberToObject(c, "gets", (double)k->gets);
        cJSON_AddNumberToObject(c, "hits", (double)k->hits);
        cJSON_AddNumberToObject(c, "misses", (double)k->misses);
        cJSON_AddNumberToObject(c, "evictions", (double)k->evictions);
        cJSON_AddNumberToObject(c, "removes", (double)k->removes);
        cJSON_AddNumberToObject(c, "expired_clients", (double)k->expired_clients);
        cJSON_AddNumberToObject(c, "disconnected_clients", (double)k->disconnected_clients);
        cJSON_AddNumberToObject(c, "revoked_puts", (double)k->revoked_puts);
        cJSON_AddNumberToObject(c, "fenced_puts", (double)k->fenced_puts);
        cJSON_AddNumberToObject(c, "fences", (double)k->fences);
        cJSON_AddNumberToObject(c, "recovered_objects", (double)k->recovered_objects);
        cJSON_AddNumberToObject(c, "recovery_refused", (double)k->recovery_rejected);
        cJSON_AddNumberToObject(c, "dir_listed", (double)k->dir_listed);
        cJSON_AddNumberToObject(c, "dir_unlisted", (double)k->dir_unlisted);
        cJSON_AddNumberToObject(c, "expired_leases", (double)k->expired_leases);
        cJSON_AddNumberToObject(c, "bad_frames", (double)k->bad_frames);
        cJSON_AddNumberToObject(c, "auth_failures", (double)k->auth_failures);
    }
    char *s = (segs && cx.arr && c && !cx.fail) ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return s;
}

static void metric(kvs_wbuf *w, const char *name, const char *type, const char *help,
                   double v)
{
    char line[512];
    int integral = v >= 0 && v < 9007199254740992.0 && v == (double)(uint64_t)v;
    int n = integral ? snprintf(line, sizeof line, "# HELP %s %s\n# TYPE %s %s\n%s %llu\n", name,
                                help, name, type, name, (unsigned long long)v)
                     : snprintf(line, sizeof line, "# HELP %s %s\n# TYPE %s %s\n%s %.3f\n", name,
                                help, name, type, name, v);
    if (n > 0) kvs_wbuf_put(w, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

char *kvs_master_metrics_text(kvs_master *m, long extra_metadata_keys, size_t *len)
{
    kvs_wbuf w;
    kvs_wbuf_init(&w);
    totals t = pool_totals(m);
    const kvs_master_counters *k = &m->cnt;
    metric(&w, "kvshelf_uptime_seconds", "gauge", "Seconds since the master started.",
           (double)uptime_ms(m) / 1000.0);
    metric(&w, "kvshelf_capacity_bytes", "gauge", "Bytes of all mounted segments.",
           (double)t.capacity);
    metric(&w, "kvshelf_used_bytes", "gauge", "Bytes allocated to objects.", (double)t.used);
    metric(&w, "kvshelf_objects", "gauge", "Complete objects stored.", (double)m->n_complete);
    metric(&w, "kvshelf_writing_objects", "gauge", "Puts started and not yet ended.",
           (double)(m->ix.count - m->n_complete - m->n_unlisting));
    metric(&w, "kvshelf_leases", "gauge", "Live read leases.", (double)m->leases.count);
    metric(&w, "kvshelf_segments", "gauge", "Mounted segments.", (double)m->segs.n);
    metric(&w, "kvshelf_clients", "gauge", "Registered clients.", (double)m->clients.count);
    if (extra_metadata_keys >= 0)
        metric(&w, "kvshelf_metadata_keys", "gauge", "Keys in the embedded metadata service.",
               (double)extra_metadata_keys);
    metric(&w, "kvshelf_puts_total", "counter", "Objects published (PUT_END ok).",
           (double)k->puts);
    metric(&w, "kvshelf_gets_total", "counter", "Keys looked up by GET.", (double)k->gets);
    metric(&w, "kvshelf_hits_total", "counter", "GET keys found.", (double)k->hits);
    metric(&w, "kvshelf_misses_total", "counter", "GET keys not found.", (double)k->misses);
    metric(&w, "kvshelf_evictions_total", "counter", "Objects evicted.", (double)k->evictions);
    metric(&w, "kvshelf_removes_total", "counter", "Objects removed.", (double)k->removes);
    metric(&w, "kvshelf_expired_clients_total", "counter", "Clients expired (silent for TTL).",
           (double)k->expired_clients);
    metric(&w, "kvshelf_disconnected_clients_total", "counter",
           "Clients expired soon after their connection closed (also in expired_clients).",
           (double)k->disconnected_clients);
    metric(&w, "kvshelf_revoked_puts_total", "counter",
           "Puts revoked (timeout or writer expired).", (double)k->revoked_puts);
    metric(&w, "kvshelf_fenced_puts_total", "counter",
           "Given-up puts whose space was held until the segment's owner fenced it.",
           (double)k->fenced_puts);
    metric(&w, "kvshelf_fences_total", "counter",
           "Fences confirmed by segment owners (space of given-up puts freed).",
           (double)k->fences);
    kvs_master_recovery rv;
    kvs_master_get_recovery(m, &rv);
    metric(&w, "kvshelf_recovery_complete", "gauge",
           "1 once the index rebuild from the segments' directories is complete.",
           rv.complete ? 1.0 : 0.0);
    metric(&w, "kvshelf_recovery_segments_pending", "gauge",
           "Mounted segments whose directory has not been handed in yet.",
           (double)rv.segments_pending);
    metric(&w, "kvshelf_recovered_objects_total", "counter",
           "Objects taken back from segments' directories (after a restart or re-mount).",
           (double)k->recovered_objects);
    metric(&w, "kvshelf_recovery_refused_total", "counter",
           "Directory entries refused (overlap, key stored already, bounds).",
           (double)k->recovery_rejected);
    metric(&w, "kvshelf_expired_leases_total", "counter", "Leases that timed out.",
           (double)k->expired_leases);
    metric(&w, "kvshelf_bad_frames_total", "counter", "Malformed frames (connection closed).",
           (double)k->bad_frames);
    metric(&w, "kvshelf_auth_failures_total", "counter", "Refused HELLOs and pre-HELLO requests.",
           (double)k->auth_failures);
    kvs_wbuf_u8(&w, 0);
    if (w.err) {
        kvs_wbuf_free(&w);
        return NULL;
    }
    *len = w.len - 1;
    return (char *)w.data;
}
