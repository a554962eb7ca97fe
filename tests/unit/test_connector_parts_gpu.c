/* kvs_connector_dump_parts / load_parts with cudaMalloc'd parts (device 0):
 * the bodies of test_connector_parts.c plus the after_event contract and
 * parts cut into kernel pieces, run three times: backend "auto" (small
 * parts through the gather/scatter kernel, big ones through copy engines),
 * "cuda-kernel" and "cuda-batch" (every copy one way; KVSHELF_TEST_BACKEND
 * runs one). Skips (exit 0) when built without CUDA or when no GPU is
 * present, as on CI. */
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

/* Parts longer than a kernel piece (64 KiB: cut into several), one of 4 KiB
 * (a KV head of a 16-token block) and odd ones, at odd addresses: byte-exact
 * both ways whichever path the backend picks. */
static void test_parts_pieces(void **s)
{
    (void)s;
    static const uint64_t cols[4] = {200003, 4096, 3, 131072};
    const size_t n = 12;
    pset src, dst;
    pset_make(&src, n, 4, cols, 7, 1, 31);
    pset_make(&dst, n, 4, cols, 0, 0, 32);
    char ns[128];
    make_ns(ns, sizeof ns, "parts-pieces");
    kvs_connector *c = open_conn(&g_pool, ns, 0, NULL);
    hashes hs;
    hashes_make(&hs, n, 900);
    int res[12];
    assert_int_equal(pdump(c, hs.k, &src, NULL, res), (int)n);
    assert_int_equal(pload(c, hs.k, &dst, NULL, res), (int)n);
    pset_sync(&dst);
    for (size_t i = 0; i < n; i++) assert_true(pset_obj_equal(&src, i, &dst, i));
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
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_parts_after_event),
                                       cmocka_unit_test(test_parts_pieces),
                                       CONNECTOR_PARTS_TESTS};
    static const char *const backends[3] = {"auto", "cuda-kernel", "cuda-batch"};
    const char *only = getenv("KVSHELF_TEST_BACKEND");
    int failed = 0;
    for (int b = 0; b < 3; b++) {
        if (only && strcmp(only, backends[b])) continue;
        g_backend = backends[b];
        char name[64];
        snprintf(name, sizeof name, "connector_parts_gpu_%s", backends[b]);
        failed += cmocka_run_group_tests_name(name, tests, parts_group_setup,
                                              parts_group_teardown);
    }
    return failed;
#endif
}
