/* kvshelf — KV-cache offload for LLM inference. Umbrella header.
 *
 *   errors.h     error codes and kvs_strerror()
 *   config.h     Mooncake-compatible configuration
 *   client.h     the store client: put/get/batch/exists/remove, zero-copy slots
 *   connector.h  the KV connector: register layout, lookup, dump, load, wait
 */
#ifndef KVSHELF_H
#define KVSHELF_H

#define KVSHELF_VERSION_MAJOR 0
#define KVSHELF_VERSION_MINOR 1
#define KVSHELF_VERSION_PATCH 0
#define KVSHELF_VERSION_STRING "0.1.0"

#include "errors.h"
#include "config.h"
#include "client.h"
#include "connector.h"

#endif
