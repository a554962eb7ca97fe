/* KV connector with GPU tensors (device 0): the tests of
 * test_connector_host.c run with cudaMalloc'd KV caches, once with the
 * gather/scatter kernel and once with cudaMemcpyBatchAsync, plus the
 * after_event contract. Skips (exit 0) when built without CUDA or when no
 * GPU is present, as on CI. */
#include "test_connector_util.h"

#ifdef KVS_HAVE_CUDA
#include <cuda_runtime_api.h>

static void sleep_cb(void *arg)
{
    (void)arg;
    usleep(300 * 1000);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A dump given an event copies what the stream wrote before the event,
 * returns at once, and never waits on the caller's stream from the caller's
 * thread. The event may be re-recorded right after dump returns. */
static void test_after_event(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 32, n = 8;
    tkv_make(&kv, "vllm", 4, 2, 64, 16, nb, 91);
    char ns[128];
    make_ns(ns, sizeof ns, "event");
    kvs_connector *c = open_kv(&g_pool, ns, &kv, NULL);
    /* new contents, in device memory, written by the stream after a stall */
    uint8_t *fresh[TKV_MAXA];
    uint8_t **want = tkv_snapshot(&kv);
    for (size_t a = 0; a < kv.na; a++) {
        fill_random(want[a], kv.allocsz[a], 5000 + a);
        fresh[a] = kvs_cuda_dev_alloc(0, kv.allocsz[a]);
        assert_non_null(fresh[a]);
        assert_int_equal(kvs_cuda_memcpy(fresh[a], want[a], kv.allocsz[a]), KVS_OK);
    }
    cudaStream_t st, other;
    cudaEvent_t ev;
    assert_int_equal(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    assert_int_equal(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), cudaSuccess);
    assert_int_equal(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), cudaSuccess);
    assert_int_equal(cudaLaunchHostFunc(st, sleep_cb, NULL), cudaSuccess);
    for (size_t a = 0; a < kv.na; a++)
        assert_int_equal(cudaMemcpyAsync(kv.alloc[a], fresh[a], kv.allocsz[a],
                                         cudaMemcpyDeviceToDevice, st),
                         cudaSuccess);
    assert_int_equal(cudaEventRecord(ev, st), cudaSuccess);

    hashes hs;
    hashes_make(&hs, n, 13);
    uint32_t src[8], dst[8];
    int res[8];
    for (uint32_t i = 0; i < n; i++) {
        src[i] = i;
        dst[i] = 16 + i;
    }
    double t0 = now_s();
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_dump(c, hs.k, src, n, ev, &t), KVS_OK);
    double t_submit = now_s() - t0;
    /* re-recording the event on an idle stream does not release the dump */
    assert_int_equal(cudaEventRecord(ev, other), cudaSuccess);
    assert_true(t_submit < 0.1);
    assert_int_equal(kvs_task_check(t), 0);
    assert_int_equal(kvs_task_wait(t, 60000), KVS_OK);
    double t_done = now_s() - t0;
    assert_true(t_done > 0.2); /* it waited for the stalled stream */
    assert_int_equal(kvs_task_results(t, res, n), (int)n);
    kvs_task_free(t);
    assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);

    /* what was stored is the new data */
    assert_int_equal(do_load(c, hs.k, dst, n, res), (int)n);
    tkv_sync(&kv);
    for (uint32_t i = 0; i < n; i++) assert_true(block_equal(&kv, want, src[i], kv.shadow, dst[i]));

    cudaEventDestroy(ev);
    cudaStreamDestroy(st);
    cudaStreamDestroy(other);
    for (size_t a = 0; a < kv.na; a++) kvs_cuda_dev_free(fresh[a]);
    tkv_snapshot_free(&kv, want);
    kvs_connector_close(c);
    hashes_free(&hs);
    tkv_free(&kv);
}

static void set_flag_cb(void *arg) { __atomic_store_n((int *)arg, 1, __ATOMIC_SEQ_CST); }

/* A closed gate holds its stream (work after it does not run) without
 * blocking the caller, until opened; a forced gate passes at once and its
 * owner learns it; a spent ticket is refused. */
static void test_gate(void **s)
{
    (void)s;
    cudaStream_t st;
    assert_int_equal(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    int flag = 0;
    uint32_t tk;
    double t0 = now_s();
    assert_int_equal(kvs_cuda_gate_close(st, 0, &tk), KVS_OK);
    assert_int_equal(cudaLaunchHostFunc(st, set_flag_cb, &flag), cudaSuccess);
    assert_true(now_s() - t0 < 0.1);
    usleep(200 * 1000);
    assert_int_equal(__atomic_load_n(&flag, __ATOMIC_SEQ_CST), 0);
    assert_int_equal(cudaStreamQuery(st), cudaErrorNotReady);
    assert_int_equal(kvs_cuda_gate_open(tk), 1);
    assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);
    assert_int_equal(flag, 1);
    assert_int_equal(kvs_cuda_gate_open(tk), -1); /* spent */

    flag = 0;
    assert_int_equal(kvs_cuda_gate_close(st, 0, &tk), KVS_OK);
    assert_int_equal(cudaLaunchHostFunc(st, set_flag_cb, &flag), cudaSuccess);
    assert_true(kvs_cuda_gates_force_open() >= 1);
    assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);
    assert_int_equal(flag, 1);
    assert_int_equal(kvs_cuda_gate_open(tk), 0); /* opened early */

    /* nobody opens it: it gives up after KVSHELF_GATE_TIMEOUT_MS (main: 1 s) */
    flag = 0;
    assert_int_equal(kvs_cuda_gate_close(st, 0, &tk), KVS_OK);
    assert_int_equal(cudaLaunchHostFunc(st, set_flag_cb, &flag), cudaSuccess);
    usleep(300 * 1000);
    assert_int_equal(__atomic_load_n(&flag, __ATOMIC_SEQ_CST), 0);
    t0 = now_s();
    assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);
    assert_true(now_s() - t0 > 0.3 && now_s() - t0 < 5);
    assert_int_equal(flag, 1);
    assert_int_equal(kvs_cuda_gate_open(tk), 0); /* timed out: early */

    /* slots are reused: many more gates than slots over time */
    for (int i = 0; i < 600; i++) {
        assert_int_equal(kvs_cuda_gate_close(st, 0, &tk), KVS_OK);
        assert_int_equal(kvs_cuda_gate_open(tk), 1);
        if (i % 100 == 99) assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);
    }
    assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);
    cudaStreamDestroy(st);
}

/* A load gated on a stream: a device copy of the loaded blocks enqueued
 * right after (before the load finished) sees the loaded bytes. */
static void test_gated_load_order(void **s)
{
    (void)s;
    tkv kv;
    const uint32_t nb = 256, n = 128;
    tkv_make(&kv, "vllm", 8, 4, 128, 16, nb, 41);
    char ns[128];
    make_ns(ns, sizeof ns, "gated");
    kvs_connector *c = open_kv(&g_pool, ns, &kv, NULL);
    hashes hs;
    hashes_make(&hs, n, 99);
    uint32_t src[128], dst[128];
    int res[128];
    ids_reversed(src, dst, n, nb);
    assert_int_equal(do_dump(c, hs.k, src, n, res), (int)n);
    uint8_t **before = tkv_snapshot(&kv);
    for (size_t a = 0; a < kv.na; a++) /* the destinations hold garbage before the load */
        assert_int_equal(cudaMemset(kv.alloc[a] + kv.allocsz[a] / 2, 0x5A, kv.allocsz[a] / 2),
                         cudaSuccess);
    assert_int_equal(cudaDeviceSynchronize(), cudaSuccess);
    cudaStream_t st;
    assert_int_equal(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    uint8_t *copy[TKV_MAXA];
    for (size_t a = 0; a < kv.na; a++) { /* before the gate: cudaMalloc synchronizes */
        copy[a] = kvs_cuda_dev_alloc(0, kv.allocsz[a]);
        assert_non_null(copy[a]);
    }
    kvs_task *t = NULL;
    assert_int_equal(kvs_connector_load(c, hs.k, dst, n, &t), KVS_OK);
    assert_int_equal(kvs_task_gpu_wait(t, st), KVS_OK);
    assert_int_equal(kvs_task_gpu_wait(t, st), KVS_ERR_INVALID); /* one gate per task */
    /* if anything forced the gate open, the task says so (KVS_ERR_EARLY) */
    for (size_t a = 0; a < kv.na; a++)
        assert_int_equal(cudaMemcpyAsync(copy[a], kv.alloc[a], kv.allocsz[a],
                                         cudaMemcpyDeviceToDevice, st),
                         cudaSuccess);
    assert_int_equal(kvs_task_wait(t, 60000), KVS_OK);
    int ok = kvs_task_results(t, res, n);
    kvs_task_free(t);
    assert_int_equal(cudaStreamSynchronize(st), cudaSuccess);
    if (ok != (int)n) {
        for (uint32_t i = 0; i < n; i++) assert_int_equal(res[i], KVS_ERR_EARLY);
    } else {
        /* what the stream copied after the gate is the loaded data */
        for (size_t a = 0; a < kv.na; a++)
            assert_int_equal(kvs_cuda_memcpy(kv.shadow[a], copy[a], kv.allocsz[a]), KVS_OK);
        for (uint32_t i = 0; i < n; i++)
            assert_true(block_equal(&kv, before, src[i], kv.shadow, dst[i]));
    }
    /* a finished task gates nothing */
    assert_int_equal(kvs_connector_load(c, hs.k, dst, n, &t), KVS_OK);
    assert_int_equal(kvs_task_wait(t, 60000), KVS_OK);
    assert_int_equal(kvs_task_gpu_wait(t, st), KVS_OK);
    kvs_task_free(t);
    for (size_t a = 0; a < kv.na; a++) kvs_cuda_dev_free(copy[a]);
    cudaStreamDestroy(st);
    tkv_snapshot_free(&kv, before);
    kvs_connector_close(c);
    hashes_free(&hs);
    tkv_free(&kv);
}

/* auto picks the copy engines for large chunks, the kernel for small ones. */
static void test_auto_choice(void **s)
{
    (void)s;
    const char *keep = g_backend;
    g_backend = "auto";
    tkv small, large;
    tkv_make(&small, "vllm", 2, 2, 64, 16, 8, 101);  /* 4 KiB chunks */
    tkv_make(&large, "vllm", 2, 8, 128, 16, 8, 102); /* 32 KiB chunks */
    char ns[128];
    make_ns(ns, sizeof ns, "auto");
    kvs_connector *c = open_conn(&g_pool, ns, 0, NULL);
    assert_string_equal(kvs_connector_backend(c), "cuda");
    assert_int_equal(kvs_connector_register_layout(c, small.lay, small.nt, small.nb), KVS_OK);
    assert_string_equal(kvs_connector_backend(c), "cuda-kernel");
    kvs_connector_close(c);
    c = open_conn(&g_pool, ns, 0, NULL);
    assert_int_equal(kvs_connector_register_layout(c, large.lay, large.nt, large.nb), KVS_OK);
    assert_string_equal(kvs_connector_backend(c), "cuda-batch");
    /* and it works */
    hashes hs;
    hashes_make(&hs, 4, 21);
    uint32_t src[4] = {0, 1, 2, 3}, dst[4] = {7, 6, 5, 4};
    int res[4];
    assert_int_equal(do_dump(c, hs.k, src, 4, res), 4);
    uint8_t **before = tkv_snapshot(&large);
    assert_int_equal(do_load(c, hs.k, dst, 4, res), 4);
    check_loaded(&large, before, src, dst, 4, res);
    tkv_snapshot_free(&large, before);
    hashes_free(&hs);
    kvs_connector_close(c);
    tkv_free(&small);
    tkv_free(&large);
    g_backend = keep;
}

/* When the segment cannot be registered with CUDA, blocks go through pinned
 * staging and still round-trip. */
static void test_register_refused(void **s)
{
    (void)s;
    setenv("KVSHELF_CUDA_NO_REGISTER", "1", 1);
    roundtrip("vllm", NULL);
    roundtrip("odd", NULL);
    unsetenv("KVSHELF_CUDA_NO_REGISTER");
}

static void test_backend_name(void **s)
{
    (void)s;
    char ns[128];
    make_ns(ns, sizeof ns, "name");
    kvs_connector *c = open_conn(&g_pool, ns, 0, NULL);
    assert_string_equal(kvs_connector_backend(c), strcmp(g_backend, "cuda-batch") ? "cuda-kernel"
                                                                                   : "cuda-batch");
    kvs_connector_close(c);
}
#endif

int main(void)
{
    setenv("KVSHELF_GATE_TIMEOUT_MS", "1000", 0); /* test_gate: a gate nobody opens */
#ifndef KVS_HAVE_CUDA
    printf("test_connector_gpu: skipped (built without CUDA)\n");
    return 0;
#else
    if (kvs_cuda_device_count() < 1) {
        printf("test_connector_gpu: skipped (no CUDA device)\n");
        return 0;
    }
    g_gpu = 1;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_backend_name),
                                       cmocka_unit_test(test_auto_choice),
                                       cmocka_unit_test(test_register_refused),
                                       cmocka_unit_test(test_after_event),
                                       cmocka_unit_test(test_gate),
                                       cmocka_unit_test(test_gated_load_order),
                                       CONNECTOR_COMMON_TESTS};
    int failed = 0;
    const char *only = getenv("KVSHELF_TEST_BACKEND");
    if (!only || !strcmp(only, "cuda-kernel")) {
        g_backend = "cuda-kernel";
        failed += cmocka_run_group_tests_name("connector_gpu_kernel", tests, group_setup,
                                              group_teardown);
    }
    if (!only || !strcmp(only, "cuda-batch")) {
        g_backend = "cuda-batch";
        failed += cmocka_run_group_tests_name("connector_gpu_batch", tests, group_setup,
                                              group_teardown);
    }
    return failed;
#endif
}
