/* Subcommands of the kvshelf CLI. Each takes argv with argv[0] = its own
 * name, parses its options (with --help), and returns the exit status:
 * 0 success, 1 failure at run time, 2 bad usage. */
#ifndef KVS_TOOLS_COMMANDS_H
#define KVS_TOOLS_COMMANDS_H

struct kvs_command {
    const char *name;
    const char *help;
    int (*fn)(int argc, char **argv);
};

int kvs_cmd_master(int argc, char **argv);   /* tools/cmd_master.c */
int kvs_cmd_node(int argc, char **argv);     /* tools/cmd_node.c */
int kvs_cmd_metadata(int argc, char **argv); /* tools/cmd_metadata.c */
int kvs_cmd_status(int argc, char **argv);   /* tools/cmd_status.c */
int kvs_cmd_stop(int argc, char **argv);     /* tools/cmd_status.c */
int kvs_cmd_bench(int argc, char **argv);    /* tools/cmd_bench.c */
int kvs_cmd_put(int argc, char **argv);      /* tools/cmd_kv.c */
int kvs_cmd_get(int argc, char **argv);      /* tools/cmd_kv.c */
int kvs_cmd_rm(int argc, char **argv);       /* tools/cmd_kv.c */
int kvs_cmd_demo(int argc, char **argv);     /* tools/cmd_demo.c */
int kvs_cmd_verify(int argc, char **argv);   /* tools/cmd_verify.c */

#endif
