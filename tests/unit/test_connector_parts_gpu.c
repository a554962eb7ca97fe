/* kvs_connector_dump_parts / load_parts with cudaMalloc'd parts (device 0):
 * the bodies of test_connector_parts.c plus the after_event contract. Skips
 * (exit 0) when built without CUDA or when no GPU is present, as on CI. */
#include "test_connector_parts_util.h"

#ifdef KVS_HAVE_CUDA
#include <cuda_runtime_api.h>

static void psleep_cb(void *arg)
{
    (void)arg;
    usleep(300 * 1000);
}

/* A parts dump given an event copies what the stream wrote before it. */
static void test_parts_after_event(void **s)
{
    (void)s;
    static const uint64_t cols[2] = {64 << 10, 4096};
    const size_t n = 8;
    pset src, dst;
    pset_make(&src, n, 2, cols, 0, 0, 21);
    pset_make(&dst, n, 2, cols, 0, 0, 22);
    uint8_t *want = malloc(src.bytes);
    fill_random(want, src.bytes, 23);
    uint8_t *fresh = kvs_cuda_dev_alloc(0, src.bytes);
    assert_non_null(fresh);
    assert_int_equal(kvs_cuda_memcpy(fresh, want, src.bytes), KVS_OK);
    cudaStream_t st;
    cudaEvent_t ev;
    assert_int_equal(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    assert_int_equal(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), cudaSuccess);
    assert_int_equal(cudaLaunchHostFunc(st, psleep_cb, NULL), cudaSuccess);
    assert_int_equal(
        cudaMemcpyAsync(src.mem, fresh, src.bytes, cudaMemcpyDeviceToDevice, st), cudaSuccess);
    assert_int_equal(cudaEventRecord(ev, st), cudaSuccess);
    char ns[128];
    make_ns(ns, sizeof ns, "parts-event");
    kvs_connector *c = open_conn(&g_pool, ns, 0, NULL);
    hashes hs;
    hashes_make(&hs, n, 800);
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_dump_parts(c, hs.k, n, src.addrs, src.lens, 2, ev, &t),
                     KVS_OK);
    int res[8];
    assert_int_equal(parts_run(t, res, n), (int)n);
    assert_int_equal(pload(c, hs.k, &dst, NULL, res), (int)n);
    memcpy(src.shadow, want, src.bytes); /* what the stream wrote */
    pset_sync(&dst);
    for (size_t i = 0; i < n; i++) assert_true(pset_obj_equal(&src, i, &dst, i));
    cudaStreamSynchronize(st);
    cudaEventDestroy(ev);
    cudaStreamDestroy(st);
    kvs_cuda_dev_free(fresh);
    free(want);
    hashes_free(&hs);
    pset_free(&src);
    pset_free(&dst);
    kvs_connector_close(c);
}
#endif

int main(void)
{
#ifndef KVS_HAVE_CUDA
    printf("test_connector_parts_gpu: skipped (built without CUDA)\n");
    return 0;
#else
    if (kvs_cuda_device_count() < 1) {
        printf("test_connector_parts_gpu: skipped (no CUDA device)\n");
        return 0;
    }
    g_gpu = 1;
    g_backend = "auto";
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_parts_after_event),
                                       CONNECTOR_PARTS_TESTS};
    return cmocka_run_group_tests_name("connector_parts_gpu", tests, parts_group_setup,
                                       parts_group_teardown);
#endif
}
