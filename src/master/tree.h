/* Intrusive treap (randomized balanced binary search tree) ordered by the
 * key pair (k1, k2), which must be unique within a tree. Expected O(log n)
 * insert, remove and ordered searches. The tree owns no memory: nodes are
 * embedded in the caller's structures. */
#ifndef KVS_MASTER_TREE_H
#define KVS_MASTER_TREE_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvs_tnode {
    struct kvs_tnode *l, *r;
    uint64_t k1, k2;
    uint32_t prio;
} kvs_tnode;

typedef struct kvs_tree {
    kvs_tnode *root;
    uint32_t rng;
    size_t count;
} kvs_tree;

/* Initializes an empty tree; `seed` feeds the node priorities. */
void kvs_tree_init(kvs_tree *t, uint32_t seed);

/* Inserts n, whose k1/k2 the caller has set (unique in the tree). */
void kvs_tree_insert(kvs_tree *t, kvs_tnode *n);

/* Removes n, which must be in t. */
void kvs_tree_remove(kvs_tree *t, kvs_tnode *n);

/* Smallest node with key >= (k1, k2), or NULL. */
kvs_tnode *kvs_tree_ceil(const kvs_tree *t, uint64_t k1, uint64_t k2);

/* Largest node with key < (k1, k2), or NULL. */
kvs_tnode *kvs_tree_lower(const kvs_tree *t, uint64_t k1, uint64_t k2);

/* Largest node, or NULL when empty. */
kvs_tnode *kvs_tree_max(const kvs_tree *t);

#endif
