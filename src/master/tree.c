/* Treap: a binary search tree on (k1, k2) that is also a max-heap on
 * random priorities, which keeps its expected depth logarithmic. */
#include "master/tree.h"

static int key_less(uint64_t a1, uint64_t a2, uint64_t b1, uint64_t b2)
{
    return a1 < b1 || (a1 == b1 && a2 < b2);
}

void kvs_tree_init(kvs_tree *t, uint32_t seed)
{
    t->root = NULL;
    t->rng = seed ? seed : 0x9e3779b9u;
    t->count = 0;
}

static uint32_t next_prio(kvs_tree *t)
{
    uint32_t x = t->rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    t->rng = x;
    return x;
}

/* Splits t into nodes < key (*l) and nodes >= key (*r). */
static void split(kvs_tnode *t, uint64_t k1, uint64_t k2, kvs_tnode **l, kvs_tnode **r)
{
    while (t) {
        if (key_less(t->k1, t->k2, k1, k2)) {
            *l = t;
            l = &t->r;
            t = t->r;
        } else {
            *r = t;
            r = &t->l;
            t = t->l;
        }
    }
    *l = NULL;
    *r = NULL;
}

/* Joins a and b where every key of a is below every key of b. */
static kvs_tnode *merge(kvs_tnode *a, kvs_tnode *b)
{
    kvs_tnode *root = NULL, **link = &root;
    while (a && b) {
        if (a->prio >= b->prio) {
            *link = a;
            link = &a->r;
            a = a->r;
        } else {
            *link = b;
            link = &b->l;
            b = b->l;
        }
    }
    *link = a ? a : b;
    return root;
}

void kvs_tree_insert(kvs_tree *t, kvs_tnode *n)
{
    n->prio = next_prio(t);
    n->l = n->r = NULL;
    kvs_tnode **link = &t->root;
    while (*link && (*link)->prio > n->prio)
        link = key_less(n->k1, n->k2, (*link)->k1, (*link)->k2) ? &(*link)->l : &(*link)->r;
    split(*link, n->k1, n->k2, &n->l, &n->r);
    *link = n;
    t->count++;
}

void kvs_tree_remove(kvs_tree *t, kvs_tnode *n)
{
    kvs_tnode **link = &t->root;
    while (*link && *link != n)
        link = key_less(n->k1, n->k2, (*link)->k1, (*link)->k2) ? &(*link)->l : &(*link)->r;
    if (!*link) return;
    *link = merge(n->l, n->r);
    n->l = n->r = NULL;
    t->count--;
}

kvs_tnode *kvs_tree_ceil(const kvs_tree *t, uint64_t k1, uint64_t k2)
{
    kvs_tnode *best = NULL, *x = t->root;
    while (x) {
        if (key_less(x->k1, x->k2, k1, k2)) {
            x = x->r;
        } else {
            best = x;
            x = x->l;
        }
    }
    return best;
}

kvs_tnode *kvs_tree_lower(const kvs_tree *t, uint64_t k1, uint64_t k2)
{
    kvs_tnode *best = NULL, *x = t->root;
    while (x) {
        if (key_less(x->k1, x->k2, k1, k2)) {
            best = x;
            x = x->r;
        } else {
            x = x->l;
        }
    }
    return best;
}

kvs_tnode *kvs_tree_max(const kvs_tree *t)
{
    kvs_tnode *x = t->root;
    while (x && x->r) x = x->r;
    return x;
}
