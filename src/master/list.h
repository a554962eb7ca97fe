/* Intrusive circular doubly-linked list (header-only). A kvs_list used as a
 * head is empty when it points at itself; an element is unlinked when its
 * pointers are NULL (kvs_list_unlinked). No allocation, no ownership. */
#ifndef KVS_MASTER_LIST_H
#define KVS_MASTER_LIST_H

#include <stddef.h>

typedef struct kvs_list {
    struct kvs_list *prev, *next;
} kvs_list;

#define KVS_CONTAINER_OF(p, type, member) ((type *)((char *)(p)-offsetof(type, member)))

static inline void kvs_list_init(kvs_list *h) { h->prev = h->next = h; }
static inline int kvs_list_empty(const kvs_list *h) { return h->next == h; }
static inline int kvs_list_linked(const kvs_list *e) { return e->next != NULL; }

/* Appends e at the tail of h (the most recent end). */
static inline void kvs_list_push_back(kvs_list *h, kvs_list *e)
{
    e->prev = h->prev;
    e->next = h;
    h->prev->next = e;
    h->prev = e;
}

/* Unlinks e (no-op if not linked) and marks it unlinked. */
static inline void kvs_list_remove(kvs_list *e)
{
    if (!e->next) return;
    e->prev->next = e->next;
    e->next->prev = e->prev;
    e->prev = e->next = NULL;
}

#endif
