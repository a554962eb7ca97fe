/* kvshelf — the one command: dispatches to subcommands (tools/cmd_*.c). */
#include <stdio.h>
#include <string.h>

#include "kvshelf/kvshelf.h"
#include "tools/commands.h"

static const struct kvs_command commands[] = {
    {"master", "run the master (object index, allocation, metrics; embeds the metadata service)",
     kvs_cmd_master},
    {"node", "run a storage node: contribute a segment of host memory to a pool", kvs_cmd_node},
    {"metadata", "run the Mooncake-compatible HTTP metadata service alone", kvs_cmd_metadata},
    {"status", "show the pool: segments, capacity and use, objects, clients", kvs_cmd_status},
    {"stop", "stop the embedded host-local pool (or a master given with --master)", kvs_cmd_stop},
    {"bench", "measure put/get/exists throughput and latency", kvs_cmd_bench},
    {"verify", "check that no read returns wrong bytes, under faults (key+version values)",
     kvs_cmd_verify},
    {"put", "store a value (debugging)", kvs_cmd_put},
    {"get", "fetch a value (debugging)", kvs_cmd_get},
    {"rm", "remove keys (debugging)", kvs_cmd_rm},
    {"demo", "the main job: dump, lookup and load KV blocks through the embedded pool",
     kvs_cmd_demo},
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvshelf <command> [options]\n"
            "       kvshelf <command> --help\n\n"
            "KV-cache offload store for LLM inference (version %s).\n\ncommands:\n",
            KVSHELF_VERSION_STRING);
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f,
            "\nConfiguration comes from --config FILE (JSON, Mooncake keys), the KVSHELF_*\n"
            "environment variables and command-line options, in that order.\n"
            "With no master address, commands use the embedded host-local pool.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("kvshelf %s\n", KVSHELF_VERSION_STRING);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "kvshelf: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
