/* kvshelf — client configuration (Mooncake-compatible keys).
 *
 * A kvs_config is a plain struct with fixed-size fields: it owns no heap
 * memory, can be copied with `=`, and needs no free. Fill it with
 * kvs_config_init() (the defaults), then optionally overlay a JSON object,
 * a JSON file and/or the environment, in the order you choose.
 *
 * Keys (JSON / environment variable):
 *   local_hostname         KVSHELF_LOCAL_HOSTNAME        address peers use to reach this process
 *                                                          (default "127.0.0.1")
 *   metadata_server        KVSHELF_METADATA_SERVER       Mooncake metadata URL, e.g.
 *                                                          "http://127.0.0.1:23790/metadata",
 *                                                          "etcd://host:port[,host:port]" (keys
 *                                                          stored in etcd as they are), or ""
 *   master_server_address  KVSHELF_MASTER_SERVER_ADDRESS "host:port" or "unix:/path"; empty means
 *                                                          the embedded host-local pool;
 *                                                          "etcd://host:port[,host:port][/prefix]"
 *                                                          means the leader of several masters
 *                                                          elected through etcd (key
 *                                                          <prefix>/leader, default prefix
 *                                                          "kvshelf"), looked up at every connect
 *   protocol               KVSHELF_PROTOCOL              "tcp" (default) or "rdma" (not built yet)
 *   device_name            KVSHELF_DEVICE_NAME           RDMA NICs, comma-separated, no spaces
 *   global_segment_size    KVSHELF_GLOBAL_SEGMENT_SIZE   bytes this client contributes
 *                                                          (default 3355443200; 0 = none)
 *   local_buffer_size      KVSHELF_LOCAL_BUFFER_SIZE     bytes of staging buffer (default 1073741824)
 *   secret                 KVSHELF_SECRET                shared secret; required when anything
 *                                                          listens beyond loopback. Empty: the
 *                                                          user's pool secret, read from (or
 *                                                          created in) <runtime_dir>/secret
 *   timeout_ms             KVSHELF_TIMEOUT_MS            per-request timeout (default 5000)
 *   runtime_dir            KVSHELF_RUNTIME_DIR           the user's kvshelf directory: the
 *                                                          embedded pool's socket, and the pool
 *                                                          secret used when `secret` is empty
 *                                                          (default $KVSHELF_RUNTIME_DIR, else
 *                                                          $XDG_RUNTIME_DIR/kvshelf, else
 *                                                          /tmp/kvshelf-<uid>)
 * Sizes accept a JSON number or a string with an optional suffix
 * (K, M, G, T, KB, MB, GB, KiB, MiB, GiB; all powers of 1024), e.g. "3.125GiB".
 * Unknown keys and invalid values are errors (KVS_ERR_CONFIG) with a message.
 */
#ifndef KVSHELF_CONFIG_H
#define KVSHELF_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVS_DEFAULT_GLOBAL_SEGMENT_SIZE 3355443200ULL
#define KVS_DEFAULT_LOCAL_BUFFER_SIZE 1073741824ULL
#define KVS_DEFAULT_TIMEOUT_MS 5000
#define KVS_DEFAULT_MASTER_PORT 50001
#define KVS_DEFAULT_METADATA_PORT 23790

typedef struct kvs_config {
    char local_hostname[256];
    char metadata_server[512];
    char master_server_address[256];
    char protocol[16];
    char device_name[256];
    char secret[256];
    char runtime_dir[512];
    uint64_t global_segment_size;
    uint64_t local_buffer_size;
    int timeout_ms;
} kvs_config;

/* Fills `cfg` with the defaults listed above. Never fails. */
void kvs_config_init(kvs_config *cfg);

/* Overlays the keys of a JSON object given as text. On error returns
 * KVS_ERR_CONFIG (or KVS_ERR_INVALID for NULL arguments), writes a message
 * into `err` (if non-NULL, always NUL-terminated) and leaves `cfg` unchanged. */
int kvs_config_load_json(kvs_config *cfg, const char *json_text, char *err, size_t errlen);

/* Same as kvs_config_load_json() for the file at `path` (KVS_ERR_IO if it
 * cannot be read). */
int kvs_config_load_file(kvs_config *cfg, const char *path, char *err, size_t errlen);

/* Overlays the KVSHELF_* environment variables above. If KVSHELF_CONFIG or
 * MOONCAKE_CONFIG_PATH names a JSON file, that file is loaded first. */
int kvs_config_load_env(kvs_config *cfg, char *err, size_t errlen);

/* Checks the whole configuration for consistency (protocol known, sizes
 * sane, secret present when local_hostname is not loopback, ...).
 * Returns KVS_OK or KVS_ERR_CONFIG with a message. */
int kvs_config_validate(const kvs_config *cfg, char *err, size_t errlen);

/* Parses a size such as "1073741824", "64MiB" or "3.125GB" into bytes.
 * Returns KVS_OK or KVS_ERR_CONFIG. */
int kvs_parse_size(const char *text, uint64_t *out);

#ifdef __cplusplus
}
#endif
#endif
