/* `kvshelf node`: a storage node. Contributes a segment of host memory to a
 * pool (MOUNT at the master, transfer server for peers) until SIGTERM or
 * SIGINT; reconnects and re-mounts on its own if the master restarts. */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client_ext.h"
#include "common/log.h"
#include "common/util.h"
#include "kvshelf/kvshelf.h"
#include "segment/prefault.h"
#include "tools/commands.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvshelf node --master ADDR --segment-size N [--local-hostname H]\n"
            "                    [--secret S] [--config FILE] [--verbose]\n\n"
            "Contributes N bytes of shared host memory to the pool of the master at ADDR\n"
            "and serves them to other hosts through a transfer server, until SIGTERM or\n"
            "SIGINT (its objects are then dropped). If the master restarts, the node\n"
            "reconnects and mounts its segment again.\n\n"
            "  --master ADDR          master address, host:port or unix:/path\n"
            "                         (or master_server_address in the configuration)\n"
            "  --segment-size N       bytes to contribute, e.g. 64GiB (default\n"
            "                         global_segment_size of the configuration)\n"
            "  --local-hostname H     address peers use to reach this node (default\n"
            "                         127.0.0.1; anything beyond loopback needs a secret)\n"
            "  --secret S             shared secret (or KVSHELF_SECRET; default: this user's\n"
            "                         pool secret, <runtime dir>/secret; it also guards this\n"
            "                         node's transfer server)\n"
            "  --config FILE          JSON configuration (Mooncake keys)\n"
            "  -v, --verbose          log more\n"
            "  -h, --help             this text\n\n"
            "Transfer server limits (environment): KVSHELF_XFER_MAX_CONNS connections,\n"
            "one thread each (default 256, at most (open-files limit - 32) / 2); a\n"
            "connection must say HELLO within KVSHELF_XFER_HELLO_MS (default 3000) or is\n"
            "closed. If the node dies, the master drops its segment within about a second.\n\n"
            "Configuration: --config FILE, then KVSHELF_* environment variables, then\n"
            "these options. Exit status: 0 stopped by a signal, 1 failure, 2 bad usage.\n");
}

int kvs_cmd_node(int argc, char **argv)
{
    enum { O_MASTER = 256, O_SIZE, O_HOST, O_SECRET, O_CONFIG };
    static const struct option lo[] = {
        {"master", required_argument, 0, O_MASTER},
        {"segment-size", required_argument, 0, O_SIZE},
        {"local-hostname", required_argument, 0, O_HOST},
        {"secret", required_argument, 0, O_SECRET},
        {"config", required_argument, 0, O_CONFIG},
        {"verbose", no_argument, 0, 'v'},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *master = NULL, *size = NULL, *host = NULL, *secret = NULL, *config = NULL;
    int verbose = 0;
    kvs_log_set_name("node");
    optind = 1;
    opterr = 0;
    for (;;) {
        int ch = getopt_long(argc, argv, "vh", lo, NULL);
        if (ch < 0) break;
        switch (ch) {
        case O_MASTER: master = optarg; break;
        case O_SIZE: size = optarg; break;
        case O_HOST: host = optarg; break;
        case O_SECRET: secret = optarg; break;
        case O_CONFIG: config = optarg; break;
        case 'v': verbose = 1; break;
        case 'h': usage(stdout); return 0;
        default:
            fprintf(stderr, "kvshelf node: unknown or incomplete option '%s'\n\n",
                    argv[optind - 1]);
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvshelf node: unexpected argument '%s'\n\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (verbose) kvs_log_set_level(KVS_LOG_INFO);

    kvs_config cfg;
    kvs_config_init(&cfg);
    char err[512] = "";
    if (config && kvs_config_load_file(&cfg, config, err, sizeof err)) {
        fprintf(stderr, "kvshelf node: %s\n", err);
        return 2;
    }
    if (kvs_config_load_env(&cfg, err, sizeof err)) {
        fprintf(stderr, "kvshelf node: %s\n", err);
        return 2;
    }
    if (master && kvs_strlcpy(cfg.master_server_address, master, sizeof cfg.master_server_address)) {
        fprintf(stderr, "kvshelf node: --master is too long\n");
        return 2;
    }
    if (host && kvs_strlcpy(cfg.local_hostname, host, sizeof cfg.local_hostname)) {
        fprintf(stderr, "kvshelf node: --local-hostname is too long\n");
        return 2;
    }
    if (secret && kvs_strlcpy(cfg.secret, secret, sizeof cfg.secret)) {
        fprintf(stderr, "kvshelf node: --secret is too long\n");
        return 2;
    }
    if (size && (kvs_parse_size(size, &cfg.global_segment_size) || !cfg.global_segment_size)) {
        fprintf(stderr, "kvshelf node: invalid --segment-size '%s' (e.g. 4294967296 or 4GiB)\n",
                size);
        return 2;
    }
    if (!cfg.master_server_address[0]) {
        fprintf(stderr,
                "kvshelf node: a node needs a master: give --master ADDR (the embedded pool\n"
                "owns its own memory; see 'kvshelf master --embedded')\n");
        return 2;
    }
    if (!cfg.global_segment_size) {
        fprintf(stderr, "kvshelf node: --segment-size must be more than 0\n");
        return 2;
    }
    if (kvs_config_validate(&cfg, err, sizeof err)) {
        fprintf(stderr, "kvshelf node: %s\n", err);
        return 2;
    }

    /* Block the stop signals in every thread; this one waits for them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    kvs_client_opts o = {KVS_ROLE_NODE, 0, 1};
    kvs_client *c = NULL;
    kvs_prefault_set_default(1); /* holding memory is this process's job */
    int rc = kvs_client_open_opts(&cfg, &o, &c, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvshelf node: %s (%s)\n", err[0] ? err : kvs_strerror(rc),
                kvs_errname(rc));
        return 1;
    }
    fprintf(stderr,
            "kvshelf node: contributing %llu bytes (segment %u) to the master %s; transfer "
            "server %s\n",
            (unsigned long long)cfg.global_segment_size, kvs_client_segment_id(c),
            kvs_client_master_addr(c), kvs_client_transfer_addr(c));
    int sig = 0;
    while (sigwait(&set, &sig) != 0) {
    }
    fprintf(stderr, "kvshelf node: signal %d, unmounting and stopping\n", sig);
    kvs_client_close(c);
    return 0;
}
