/* The client configuration of the load-generating subcommands (bench,
 * verify): the --config file, then the environment (KVSHELF_<KEY>), then
 * the command's own options. */
#ifndef KVS_TOOLS_CLIENT_CONFIG_H
#define KVS_TOOLS_CLIENT_CONFIG_H

#include "kvshelf/config.h"

typedef struct kvs_cli_client_opts {
    const char *config_file; /* --config, or NULL */
    const char *master;      /* --master, or NULL */
    const char *segsize;     /* --segment-size, or NULL */
    const char *secret;      /* --secret, or NULL */
    long timeout_ms;         /* --timeout-ms, or <= 0 */
} kvs_cli_client_opts;

/* Fills *cfg (already kvs_config_init'ed) from o. A client with a master
 * address contributes no memory unless --segment-size asks (reads of data
 * held by nodes then go through the transfer engine); in the embedded pool
 * the size is the pool's own. On a bad value prints "kvshelf <cmd>: ..." to
 * stderr and returns 2 (the usage exit status); else 0. */
int kvs_cli_client_config(const char *cmd, const kvs_cli_client_opts *o, kvs_config *cfg);

#endif
