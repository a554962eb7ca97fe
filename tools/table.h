/* Plain-text tables for the CLI: cells are collected row by row, then
 * printed with each column as wide as its widest cell, so long ids never
 * push the next column out of line. */
#ifndef KVS_TOOLS_TABLE_H
#define KVS_TOOLS_TABLE_H

#include <stdio.h>

typedef struct kvs_table kvs_table;

/* A table of `ncols` columns (<= 16) whose header is `names`; right_mask bit
 * i right-aligns column i (numbers). NULL on out of memory. */
kvs_table *kvs_table_new(int ncols, const char *const *names, unsigned right_mask);

/* Appends a row of ncols strings (copied; NULL prints as empty). Returns 0,
 * or -1 on out of memory (the row is dropped). */
int kvs_table_add(kvs_table *t, const char *const *cells);

/* Prints header and rows to f, each line starting with `indent` spaces,
 * columns separated by two spaces (the last column is not padded). */
void kvs_table_print(const kvs_table *t, FILE *f, int indent);

/* Frees the table. NULL ok. */
void kvs_table_free(kvs_table *t);

#endif
