/* kvs_connector_dump_parts / load_parts with host memory (device -2) against
 * a real embedded pool: byte-exact round trips (namespaced and raw keys, odd
 * sizes and addresses, staging, checksums), many objects, misses, size /
 * count / tag mismatches that copy nothing, invalid arguments, concurrent
 * tasks, backpressure, close in flight. The same bodies run on a GPU in
 * test_connector_parts_gpu.c. */
#include "test_connector_parts_util.h"

int main(void)
{
    g_gpu = 0;
    g_backend = "auto";
    const struct CMUnitTest tests[] = {CONNECTOR_PARTS_TESTS};
    return cmocka_run_group_tests_name("connector_parts_host", tests, parts_group_setup,
                                       parts_group_teardown);
}
