/* KV connector with host tensors (device -2, host copy backend) against a
 * real embedded pool: every layout round-trips byte-exact, prefix hits,
 * misses, removed/evicted/corrupt objects are misses, lookup-only clients,
 * concurrency, timeouts, backpressure, close with tasks in flight. The same
 * bodies run with GPU tensors in test_connector_gpu.c. */
#include "test_connector_util.h"

int main(void)
{
    g_gpu = 0;
    g_backend = "auto";
    const struct CMUnitTest tests[] = {CONNECTOR_COMMON_TESTS};
    return cmocka_run_group_tests_name("connector_host", tests, group_setup, group_teardown);
}
