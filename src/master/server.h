/* The master's RPC server: one thread running an epoll event loop over
 * non-blocking TCP and unix-socket listeners and their connections (input
 * buffer, frame parsing via kvs_master_feed, output buffer, pipelining),
 * plus a ~100 ms timer calling kvs_master_tick. Holds the master lock while
 * it handles the frames of one read and while ticking. */
#ifndef KVS_MASTER_SERVER_H
#define KVS_MASTER_SERVER_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "master/master.h"

typedef struct kvs_server kvs_server;

/* Creates a server over m (not owned). KVS_OK and *out, or KVS_ERR_IO /
 * KVS_ERR_NOMEM. */
int kvs_server_new(kvs_master *m, kvs_server **out);

/* Adds a listener on `addr` ("host:port", "[v6]:port", "unix:/path"; port 0
 * picks one). The bound TCP port goes to *port (0 for unix; may be NULL).
 * KVS_OK, KVS_ERR_CONFIG (bad address, too many listeners) or KVS_ERR_IO;
 * a message goes to err. */
int kvs_server_listen(kvs_server *s, const char *addr, uint16_t *port, char *err, size_t errlen);

/* After handling events the loop keeps polling (epoll_wait with timeout 0)
 * for this long before it sleeps: the next request of a busy client is
 * then read at once instead of after a wake-up of an idle CPU, which costs
 * tens of microseconds (far more in a VM). It burns CPU only in the gaps
 * of traffic, at most this long per gap. */
#define KVS_SERVER_BUSY_POLL_US 100u

/* Sets the busy-poll time in microseconds (0: sleep at once). */
void kvs_server_set_busy_poll(kvs_server *s, uint32_t us);

/* Runs the loop until *stop becomes non-zero or, when stop_on_shutdown, a
 * SHUTDOWN was accepted; then flushes pending replies (best effort).
 * Returns KVS_OK or KVS_ERR_IO (epoll failed). */
int kvs_server_run(kvs_server *s, volatile sig_atomic_t *stop, int stop_on_shutdown);

/* Closes every connection and listener (unix socket files are removed) and
 * frees the server. Safe with NULL. */
void kvs_server_free(kvs_server *s);

#endif
