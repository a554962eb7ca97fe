/* Client configuration shared by kvshelf bench and kvshelf verify. */
#include "tools/client_config.h"

#include <stdio.h>

#include "common/util.h"

int kvs_cli_client_config(const char *cmd, const kvs_cli_client_opts *o, kvs_config *cfg)
{
    char err[512];
    if (o->config_file && kvs_config_load_file(cfg, o->config_file, err, sizeof err) < 0) {
        fprintf(stderr, "kvshelf %s: %s\n", cmd, err);
        return 2;
    }
    if (kvs_config_load_env(cfg, err, sizeof err) < 0) {
        fprintf(stderr, "kvshelf %s: %s\n", cmd, err);
        return 2;
    }
    if (o->master) kvs_strlcpy(cfg->master_server_address, o->master, sizeof cfg->master_server_address);
    if (cfg->master_server_address[0]) cfg->global_segment_size = 0;
    if (o->segsize && kvs_parse_size(o->segsize, &cfg->global_segment_size) < 0) {
        fprintf(stderr, "kvshelf %s: bad --segment-size '%s'\n", cmd, o->segsize);
        return 2;
    }
    if (o->secret) kvs_strlcpy(cfg->secret, o->secret, sizeof cfg->secret);
    if (o->timeout_ms > 0) cfg->timeout_ms = (int)o->timeout_ms;
    if (kvs_config_validate(cfg, err, sizeof err) < 0) {
        fprintf(stderr, "kvshelf %s: %s\n", cmd, err);
        return 2;
    }
    return 0;
}
