/* KV connector: KVSHELF_CONNECTOR_PROFILE=1 — time per phase of block jobs
 * (reserve/acquire, copy, commit/release), printed at close. */
#include <stdatomic.h>
#include <stdio.h>

#include "common/util.h"
#include "connector/conn_internal.h"

void conn_profile_add(kvs_connector *c, uint64_t t0, uint64_t t1, uint64_t t2)
{
    uint64_t t3 = kvs_now_ns();
    atomic_fetch_add(&c->t_meta, t1 - t0);
    atomic_fetch_add(&c->t_copy, t2 - t1);
    atomic_fetch_add(&c->t_finish, t3 - t2);
    atomic_fetch_add(&c->n_jobs, 1);
}

void conn_profile_ra(kvs_connector *c, uint64_t t0, uint64_t t_claimed)
{
    atomic_fetch_add(&c->t_ra, kvs_now_ns() - t0);
    atomic_fetch_add(&c->t_ra_claim, t_claimed - t0);
    atomic_fetch_add(&c->n_ra, 1);
}

void conn_profile_print(const kvs_connector *c)
{
    if (!c->profile) return;
    uint64_t nj = atomic_load(&c->n_jobs);
    if (!nj) return;
    fprintf(stderr,
            "kvshelf connector profile: %llu jobs of <= %u blocks; per job: reserve/acquire "
            "%.1f us, copy %.1f us, commit/release %.1f us\n",
            (unsigned long long)nj, c->job_blocks, atomic_load(&c->t_meta) / 1e3 / nj,
            atomic_load(&c->t_copy) / 1e3 / nj, atomic_load(&c->t_finish) / 1e3 / nj);
    uint64_t nr = atomic_load(&c->n_ra);
    if (nr)
        fprintf(stderr,
                "kvshelf connector profile: %llu stripe load jobs spent %.1f us each of their "
                "copy phase taking their read-ahead and starting the next (taking: %.1f us)\n",
                (unsigned long long)nr, atomic_load(&c->t_ra) / 1e3 / nr,
                atomic_load(&c->t_ra_claim) / 1e3 / nr);
}
