/* Route table and its lock-free replacement.
 *
 * Why this shape: lookups happen per packet in the worker threads while the control plane
 * replaces the whole table whenever etcd changes. A table is built off to the side, published
 * with one atomic pointer exchange, and the old one is freed only after every worker has passed
 * a quiescent point (QSBR): each worker publishes the grace-period generation it has seen at the
 * start of every round and goes "offline" before it sleeps in poll(), so a writer never waits on
 * an idle worker and a reader never takes a lock.
 *
 * The one rule that keeps this safe: a worker is online whenever it may hold a pointer into a
 * table (a table, an entry, or anything it loaded through them). Whatever waits inside a round
 * (a full socket send buffer) goes offline only while it holds no such pointer and comes back
 * online, at a fresh generation, before it returns; pointers are loaded again after that.
 *
 * Lookup is longest-prefix match over one open-addressing hash per distinct prefix length,
 * longest first: a flannel cluster has one or two lengths (all /24, say), so a lookup is one or
 * two hash probes whatever the number of peers.
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine.h"

static uint32_t hash32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static uint32_t pow2_at_least(uint32_t n)
{
    uint32_t c = 4;
    while (c < n)
        c <<= 1;
    return c;
}

static uint32_t len_mask(int len) { return len == 0 ? 0 : 0xffffffffU << (32 - len); }

void fl_rt_free(struct fl_rtable *t)
{
    if (!t)
        return;
    for (int i = 0; i < t->n_levels; i++)
        free(t->levels[i].slots);
    free(t->hops);
    free(t->hop_port);
    free(t->hop_used);
    free(t);
}

/* Later duplicates of a prefix replace earlier ones, as flanneld's set-route does. */
struct fl_rtable *fl_rt_build(const struct fl_route *r, int n)
{
    struct fl_rtable *t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    int count[33] = {0};
    for (int i = 0; i < n; i++) {
        if (r[i].len > 32) {
            free(t);
            return NULL;
        }
        count[r[i].len]++;
    }
    int lvl_of[33];
    for (int len = 32; len >= 0; len--) {
        lvl_of[len] = -1;
        if (!count[len])
            continue;
        struct fl_rt_level *L = &t->levels[t->n_levels];
        L->len = (uint8_t)len;
        L->mask = len_mask(len);
        L->cap = pow2_at_least((uint32_t)count[len] * 2);
        L->slots = calloc(L->cap, sizeof(*L->slots));
        if (!L->slots)
            goto fail;
        lvl_of[len] = t->n_levels++;
    }
    t->hop_cap = pow2_at_least((uint32_t)n * 2);
    t->hops = calloc(t->hop_cap, sizeof(*t->hops));
    t->hop_port = calloc(t->hop_cap, sizeof(*t->hop_port));
    t->hop_used = calloc(t->hop_cap, 1);
    if (!t->hops || !t->hop_port || !t->hop_used)
        goto fail;
    for (int i = 0; i < n; i++) {
        struct fl_rt_level *L = &t->levels[lvl_of[r[i].len]];
        uint32_t net = r[i].net & L->mask;
        uint32_t h = hash32(net) & (L->cap - 1);
        while (L->slots[h].used && L->slots[h].net != net)
            h = (h + 1) & (L->cap - 1);
        if (!L->slots[h].used)
            t->n_routes++;
        L->slots[h].used = 1;
        L->slots[h].net = net;
        L->slots[h].next_hop = r[i].next_hop;
        L->slots[h].port = r[i].port;
    }
    /* The source check must only admit next hops that are still routed to: rebuild the set
     * from the final entries, not from the input (an overridden duplicate is gone). */
    for (int l = 0; l < t->n_levels; l++) {
        struct fl_rt_level *L = &t->levels[l];
        for (uint32_t s = 0; s < L->cap; s++) {
            if (!L->slots[s].used)
                continue;
            uint32_t hop = L->slots[s].next_hop;
            uint16_t port = L->slots[s].port;
            uint32_t h = hash32(hop) & (t->hop_cap - 1);
            while (t->hop_used[h] && t->hops[h] != hop)
                h = (h + 1) & (t->hop_cap - 1);
            /* One peer sends from one port (its Backend.Port). Should its routes disagree, the
             * peer's port is unknown and any source port is accepted from it (FL_PORT_ANY). */
            if (t->hop_used[h] && t->hop_port[h] != port)
                port = FL_PORT_ANY;
            t->hop_used[h] = 1;
            t->hops[h] = hop;
            t->hop_port[h] = port;
        }
    }
    return t;
fail:
    fl_rt_free(t);
    return NULL;
}

const struct fl_rt_entry *fl_rt_lookup(const struct fl_rtable *t, uint32_t dst)
{
    if (!t)
        return NULL;
    for (int l = 0; l < t->n_levels; l++) {
        const struct fl_rt_level *L = &t->levels[l];
        uint32_t net = dst & L->mask;
        uint32_t h = hash32(net) & (L->cap - 1);
        while (L->slots[h].used) {
            if (L->slots[h].net == net)
                return &L->slots[h];
            h = (h + 1) & (L->cap - 1);
        }
    }
    return NULL;
}

int fl_rt_hop_port(const struct fl_rtable *t, uint32_t hop)
{
    if (!t || !t->hop_cap)
        return -1;
    uint32_t h = hash32(hop) & (t->hop_cap - 1);
    while (t->hop_used[h]) {
        if (t->hops[h] == hop)
            return t->hop_port[h];
        h = (h + 1) & (t->hop_cap - 1);
    }
    return -1;
}

void fl_rcu_online(struct fl_worker *w)
{
    atomic_store(&w->qs, atomic_load(&w->e->gen));
}

void fl_rcu_offline(struct fl_worker *w) { atomic_store(&w->qs, FL_QS_OFFLINE); }

struct fl_rtable *fl_rcu_table(struct fl_worker *w) { return atomic_load(&w->e->table); }

static int worker_blocks(struct fl_worker *w, uint64_t g)
{
    uint64_t q = atomic_load(&w->qs);
    return q != FL_QS_OFFLINE && q < g;
}

int fl_engine_set_routes(struct fl_engine *e, const struct fl_route *r, int n)
{
    if (n < 0)
        return -1;
    struct fl_rtable *t = fl_rt_build(r, n);
    if (!t)
        return -1;
    pthread_mutex_lock(&e->wlock);
    struct fl_rtable *old = atomic_exchange(&e->table, t);
    uint64_t g = atomic_fetch_add(&e->gen, 1) + 1;
    /* Grace period: every worker either offline or past a quiescent point after the swap. */
    for (int i = 0; i < e->n_workers; i++)
        while (worker_blocks(&e->workers[i], g))
            usleep(20);
    while (worker_blocks(&e->test_worker, g))
        usleep(20);
    atomic_fetch_add(&e->c_engine[C_ROUTE_UPDATES], 1);
    /* Read before unlocking: once the lock is released another writer may replace and free t. */
    int n_routes = t->n_routes;
    pthread_mutex_unlock(&e->wlock);
    fl_rt_free(old);
    return n_routes;
}
