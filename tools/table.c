/* Plain-text tables (see table.h). */
#include "tools/table.h"

#include <stdlib.h>
#include <string.h>

#define MAX_COLS 16

struct kvs_table {
    int ncols;
    unsigned right;
    size_t nrows, cap;
    char **cells; /* (nrows + 1) x ncols, row 0 = header */
};

static int push_row(kvs_table *t, const char *const *cells)
{
    if (t->nrows == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 8;
        char **c = realloc(t->cells, cap * (size_t)t->ncols * sizeof *c);
        if (!c) return -1;
        t->cells = c;
        t->cap = cap;
    }
    size_t base = t->nrows * (size_t)t->ncols;
    for (int i = 0; i < t->ncols; i++) {
        t->cells[base + (size_t)i] = strdup(cells[i] ? cells[i] : "");
        if (!t->cells[base + (size_t)i]) {
            while (i-- > 0) free(t->cells[base + (size_t)i]);
            return -1;
        }
    }
    t->nrows++;
    return 0;
}

kvs_table *kvs_table_new(int ncols, const char *const *names, unsigned right_mask)
{
    if (ncols < 1 || ncols > MAX_COLS) return NULL;
    kvs_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->ncols = ncols;
    t->right = right_mask;
    if (push_row(t, names)) {
        kvs_table_free(t);
        return NULL;
    }
    return t;
}

int kvs_table_add(kvs_table *t, const char *const *cells) { return t ? push_row(t, cells) : -1; }

void kvs_table_print(const kvs_table *t, FILE *f, int indent)
{
    if (!t) return;
    size_t w[MAX_COLS] = {0};
    for (size_t r = 0; r < t->nrows; r++)
        for (int c = 0; c < t->ncols; c++) {
            size_t n = strlen(t->cells[r * (size_t)t->ncols + (size_t)c]);
            if (n > w[c]) w[c] = n;
        }
    for (size_t r = 0; r < t->nrows; r++) {
        fprintf(f, "%*s", indent, "");
        for (int c = 0; c < t->ncols; c++) {
            const char *s = t->cells[r * (size_t)t->ncols + (size_t)c];
            int last = c == t->ncols - 1;
            if (t->right & (1u << c)) fprintf(f, "%*s", (int)w[c], s);
            else if (last) fputs(s, f);
            else fprintf(f, "%-*s", (int)w[c], s);
            if (!last) fputs("  ", f);
        }
        fputc('\n', f);
    }
}

void kvs_table_free(kvs_table *t)
{
    if (!t) return;
    for (size_t i = 0; i < t->nrows * (size_t)t->ncols; i++) free(t->cells[i]);
    free(t->cells);
    free(t);
}
