/* Shared-memory segments: create, map by name from another process, bounds
 * of name validation, unlink on destroy, retire. */
#include <fcntl.h>
#include <signal.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvshelf/errors.h"
#include "segment/prefault.h"
#include "segment/segment.h"

static void test_create_map_destroy(void **state)
{
    (void)state;
    /* no prefault thread here: this test forks, and a thread that holds an
     * allocator lock at fork() (ASan's, glibc's) leaves it locked forever in
     * the child (seen as a rare hang under ASan on a loaded machine).
     * test_prefault covers the prefault thread. */
    setenv("KVSHELF_PREFAULT", "0", 1);
    kvs_segment s;
    assert_int_equal(kvs_segment_create(1000, &s), KVS_OK);
    assert_non_null(s.base);
    assert_int_equal(s.size % kvs_page_size(), 0);
    assert_true(s.size >= 1000);
    assert_int_equal((uintptr_t)s.base % kvs_page_size(), 0);
    assert_true(kvs_segment_name_valid(s.name));
    char want[64];
    snprintf(want, sizeof want, "kvshelf-%u-%ld-", (unsigned)getuid(), (long)getpid());
    assert_memory_equal(s.name, want, strlen(want));

    char path[128];
    snprintf(path, sizeof path, "/dev/shm/%s", s.name);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0600);

    memcpy(s.base, "hello", 5);
    /* another process maps it by name and writes */
    pid_t pid = fork();
    if (pid == 0) {
        kvs_segment m;
        if (kvs_segment_map(s.name, 0, &m) != KVS_OK) _exit(1);
        if (memcmp(m.base, "hello", 5)) _exit(2);
        memcpy((char *)m.base + 100, "world", 5);
        kvs_segment_destroy(&m);
        _exit(0);
    }
    int wst;
    assert_int_equal(waitpid(pid, &wst, 0), pid);
    assert_true(WIFEXITED(wst));
    assert_int_equal(WEXITSTATUS(wst), 0);
    assert_memory_equal((char *)s.base + 100, "world", 5);

    /* a mapping by name in this process sees the same bytes; destroy of a
     * mapping does not unlink */
    kvs_segment m;
    assert_int_equal(kvs_segment_map(s.name, s.size, &m), KVS_OK);
    assert_memory_equal((char *)m.base + 100, "world", 5);
    kvs_segment m2;
    assert_int_equal(kvs_segment_map(s.name, s.size + 1, &m2), KVS_ERR_CORRUPT); /* too small */
    assert_int_equal(kvs_segment_map(s.name, s.size, &m2), KVS_OK);
    kvs_segment_destroy(&m2);
    assert_int_equal(stat(path, &st), 0);

    /* retire: memory released, range still readable (zeros) */
    kvs_segment_retire(&m);
    assert_int_equal(((char *)m.base)[100], 0);
    kvs_segment_destroy(&m);

    char name[KVS_SHM_NAME_MAX];
    strcpy(name, s.name);
    kvs_segment_destroy(&s);
    assert_int_not_equal(stat(path, &st), 0);
    assert_int_equal(kvs_segment_map(name, 0, &m), KVS_ERR_NOT_FOUND);
    unsetenv("KVSHELF_PREFAULT");
}

static void test_names(void **state)
{
    (void)state;
    assert_true(kvs_segment_name_valid("kvshelf-1000-42-0-0123456789abcdef"));
    assert_false(kvs_segment_name_valid("kvshelf-1000-42-0"));              /* no nonce */
    assert_false(kvs_segment_name_valid("kvshelf-1000-42-0-0123456789abcde")); /* 15 hex */
    assert_false(kvs_segment_name_valid("kvshelf-1000-42-0-0123456789ABCDEF"));
    assert_false(kvs_segment_name_valid("kvshelf-1000-42-0-0123456789abcdef0"));
    assert_false(kvs_segment_name_valid("kvshelf-1000-42"));
    assert_false(kvs_segment_name_valid("kvshelf-1000-42-0/../x"));
    assert_false(kvs_segment_name_valid("../kvshelf-1-2-3"));
    assert_false(kvs_segment_name_valid("kvshelf--2-3"));
    assert_false(kvs_segment_name_valid(""));
    assert_false(kvs_segment_name_valid(NULL));
    kvs_segment m;
    assert_int_equal(kvs_segment_map("../../etc/passwd", 0, &m), KVS_ERR_INVALID);
    assert_int_equal(kvs_segment_create(0, &m), KVS_ERR_INVALID);
}

static void test_many_and_large(void **state)
{
    (void)state;
    kvs_segment s[4];
    for (int i = 0; i < 4; i++) assert_int_equal(kvs_segment_create(1ull << 30, &s[i]), KVS_OK);
    for (int i = 1; i < 4; i++) assert_string_not_equal(s[0].name, s[i].name);
    /* pages are touched lazily: writing one byte at each end works */
    for (int i = 0; i < 4; i++) {
        ((char *)s[i].base)[0] = 1;
        ((char *)s[i].base)[s[i].size - 1] = 2;
    }
    for (int i = 0; i < 4; i++) kvs_segment_destroy(&s[i]);
    kvs_segment_destroy(NULL);
}

/* A segment left by a process that died is removed by the next creator. */
static void test_gc(void **state)
{
    (void)state;
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    pid_t pid = fork();
    if (pid == 0) {
        kvs_segment s;
        if (kvs_segment_create(1 << 20, &s)) _exit(1);
        if (write(pfd[1], s.name, sizeof s.name) != (ssize_t)sizeof s.name) _exit(2);
        _exit(0); /* no destroy: the file stays */
    }
    char name[KVS_SHM_NAME_MAX];
    close(pfd[1]);
    assert_int_equal(read(pfd[0], name, sizeof name), (ssize_t)sizeof name);
    close(pfd[0]);
    waitpid(pid, NULL, 0);
    char path[128];
    snprintf(path, sizeof path, "/dev/shm/%s", name);
    struct stat st;
    /* younger than 2 s: left alone (its owner may still be taking its lock) */
    kvs_segment_gc();
    assert_int_equal(stat(path, &st), 0);
    /* a live segment of this process, as old as the orphan */
    kvs_segment live;
    assert_int_equal(kvs_segment_create(1 << 20, &live), KVS_OK);
    char lpath[128];
    snprintf(lpath, sizeof lpath, "/dev/shm/%s", live.name);
    sleep(3);
    kvs_segment_gc(); /* (another test process may have removed the orphan first) */
    assert_int_not_equal(stat(path, &st), 0);
    assert_int_equal(stat(lpath, &st), 0); /* its owner holds its lock: kept */
    kvs_segment_destroy(&live);
}

/* The owner's background thread populates every page without changing the
 * bytes already written; destroy while it runs is safe. */
static void test_prefault(void **state)
{
    (void)state;
    setenv("KVSHELF_PREFAULT", "1", 1);
    const uint64_t size = 64ull << 20;
    kvs_segment s;
    assert_int_equal(kvs_segment_create(size, &s), KVS_OK);
    memcpy(s.base, "kept", 4);
    size_t pages = size / kvs_page_size();
    unsigned char *vec = malloc(pages);
    assert_non_null(vec);
    size_t resident = 0;
    for (int i = 0; i < 500 && resident < pages; i++) {
        assert_int_equal(mincore(s.base, size, vec), 0);
        resident = 0;
        for (size_t p = 0; p < pages; p++) resident += vec[p] & 1;
        if (resident < pages) usleep(10000);
    }
    assert_int_equal(resident, pages);
    assert_memory_equal(s.base, "kept", 4);
    free(vec);
    kvs_segment_destroy(&s);

    /* stop in the middle of a large populate */
    assert_int_equal(kvs_segment_create(1ull << 30, &s), KVS_OK);
    kvs_segment_destroy(&s);
    assert_null(s.base);

    /* disabled */
    setenv("KVSHELF_PREFAULT", "0", 1);
    static char page[4096];
    assert_null(kvs_prefault_start(page, sizeof page));
    unsetenv("KVSHELF_PREFAULT");
}

/* A file of the same name whose memory is another segment (another
 * container's /dev/shm, a leftover) is refused: the name's nonce must be the
 * one written in the memory. */
static void test_identity(void **state)
{
    (void)state;
    setenv("KVSHELF_PREFAULT", "0", 1);
    kvs_segment a, b, m;
    assert_int_equal(kvs_segment_create(1 << 20, &a), KVS_OK);
    assert_int_equal(kvs_segment_create(1 << 20, &b), KVS_OK);
    assert_string_not_equal(a.name + strlen(a.name) - 16, b.name + strlen(b.name) - 16);
    /* b's memory under a name that carries another nonce */
    char fake[KVS_SHM_NAME_MAX], pa[128], pb[128];
    snprintf(fake, sizeof fake, "%.*s%016llx", (int)(strlen(b.name) - 16), b.name,
             (unsigned long long)0x1122334455667788ull);
    assert_true(kvs_segment_name_valid(fake));
    snprintf(pa, sizeof pa, "/dev/shm/%s", fake);
    snprintf(pb, sizeof pb, "/dev/shm/%s", b.name);
    assert_int_equal(link(pb, pa), 0);
    assert_int_equal(kvs_segment_map(fake, 0, &m), KVS_ERR_CORRUPT);
    unlink(pa);
    /* the real names map, each its own memory */
    memcpy(a.base, "AAAA", 4);
    assert_int_equal(kvs_segment_map(a.name, a.size, &m), KVS_OK);
    assert_memory_equal(m.base, "AAAA", 4);
    assert_int_equal(kvs_segment_epoch(&m), 1);
    kvs_segment_destroy(&m);
    kvs_segment_destroy(&a);
    kvs_segment_destroy(&b);
    unsetenv("KVSHELF_PREFAULT");
}

/* Write fencing: a writer inside under an old epoch holds a fence back; once
 * fenced, writes under older epochs are refused, in this process and in
 * others; a writer that dies releases its hold. */
static void test_fence(void **state)
{
    (void)state;
    setenv("KVSHELF_PREFAULT", "0", 1);
    kvs_segment s, m;
    assert_int_equal(kvs_segment_create(1 << 20, &s), KVS_OK);
    assert_int_equal(kvs_segment_epoch(&s), 1);
    assert_int_equal(kvs_segment_write_begin(&s, 0), KVS_ERR_INVALID);
    assert_int_equal(kvs_segment_write_begin(&s, 1), KVS_OK);
    assert_int_equal(kvs_segment_write_begin(&s, 1), KVS_OK); /* nested: counted */
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_ERR_BUSY);  /* writers inside */
    assert_int_equal(kvs_segment_epoch(&s), 2);                /* raised anyway */
    assert_int_equal(kvs_segment_write_begin(&s, 1), KVS_ERR_UNAVAILABLE); /* stale now */
    kvs_segment_write_end(&s, 1);
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_ERR_BUSY);
    kvs_segment_write_end(&s, 1);
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_OK);
    assert_int_equal(kvs_segment_write_begin(&s, 2), KVS_OK); /* current epoch: fine */
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_OK);       /* holds only older ones back */
    kvs_segment_write_end(&s, 2);
    /* a mapper is not the owner: it cannot fence */
    assert_int_equal(kvs_segment_map(s.name, 0, &m), KVS_OK);
    assert_int_equal(kvs_segment_fence(&m, 5), KVS_ERR_INVALID);
    assert_int_equal(kvs_segment_write_begin(&m, 1), KVS_ERR_UNAVAILABLE);
    kvs_segment_destroy(&m);

    /* another process enters under epoch 2 and stops there (SIGSTOP); the
     * fence to 3 waits for it; killing it releases the hold */
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    pid_t pid = fork();
    if (pid == 0) {
        kvs_segment c;
        if (kvs_segment_map(s.name, 0, &c)) _exit(1);
        char ok = kvs_segment_write_begin(&c, 2) == KVS_OK ? 'y' : 'n';
        if (write(pfd[1], &ok, 1) != 1) _exit(2);
        for (;;) pause();
    }
    close(pfd[1]);
    char ok = 0;
    assert_int_equal(read(pfd[0], &ok, 1), 1);
    close(pfd[0]);
    assert_int_equal(ok, 'y');
    kill(pid, SIGSTOP);
    assert_int_equal(kvs_segment_fence(&s, 3), KVS_ERR_BUSY);
    assert_int_equal(kvs_segment_write_begin(&s, 2), KVS_ERR_UNAVAILABLE);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    assert_int_equal(kvs_segment_fence(&s, 3), KVS_OK);
    /* epochs above the current one + 1 were never handed out: refused */
    assert_int_equal(kvs_segment_write_begin(&s, 5), KVS_ERR_UNAVAILABLE);
    /* a re-mount fences to the control page + 2: a writer that entered
     * under current + 1 (the most a registration hands out) holds it back */
    assert_int_equal(kvs_segment_write_begin(&s, 4), KVS_OK);
    assert_int_equal(kvs_segment_fence(&s, kvs_segment_epoch(&s) + 2), KVS_ERR_BUSY);
    kvs_segment_write_end(&s, 4);
    assert_int_equal(kvs_segment_fence(&s, 5), KVS_OK);
    assert_int_equal(kvs_segment_write_begin(&s, 4), KVS_ERR_UNAVAILABLE);
    kvs_segment_destroy(&s);
    unsetenv("KVSHELF_PREFAULT");
}

/* A child forked (without exec) while this process writes under a fence
 * does not keep the write lock: when this process's writer goes away
 * (closed mid-write here, as if it died), the owner can fence although the
 * child still runs. */
static void test_fork_child_holds_no_lock(void **state)
{
    (void)state;
    setenv("KVSHELF_PREFAULT", "0", 1);
    kvs_segment s, m;
    assert_int_equal(kvs_segment_create(1 << 20, &s), KVS_OK);
    assert_int_equal(kvs_segment_map(s.name, 0, &m), KVS_OK);
    assert_int_equal(kvs_segment_write_begin(&m, 1), KVS_OK);
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    pid_t pid = fork();
    if (pid == 0) {
        close(pfd[0]);
        /* the child's copies are closed: it cannot write through them */
        char ok = m.wlock_fd < 0 && kvs_segment_write_begin(&m, 1) != KVS_OK ? 'y' : 'n';
        if (write(pfd[1], &ok, 1) != 1) _exit(2);
        for (;;) pause();
    }
    close(pfd[1]);
    char ok = 0;
    assert_int_equal(read(pfd[0], &ok, 1), 1);
    close(pfd[0]);
    assert_int_equal(ok, 'y');
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_ERR_BUSY); /* our writer is inside */
    kvs_segment_destroy(&m);                                   /* ... and goes away */
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_OK);        /* the child holds nothing */
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    kvs_segment_destroy(&s);
    unsetenv("KVSHELF_PREFAULT");
}

/* A peer's segment retired (its owner left the pool): the range reads
 * zeros, its descriptors are closed -- a writer's lock goes with them, so
 * the owner can fence -- and later writes are refused. */
static void test_retire_closes(void **state)
{
    (void)state;
    setenv("KVSHELF_PREFAULT", "0", 1);
    kvs_segment s, m;
    assert_int_equal(kvs_segment_create(1 << 20, &s), KVS_OK);
    memset(s.base, 7, 4096);
    assert_int_equal(kvs_segment_map(s.name, 0, &m), KVS_OK);
    assert_int_equal(((uint8_t *)m.base)[100], 7);
    assert_int_equal(kvs_segment_write_begin(&m, 1), KVS_OK);
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_ERR_BUSY);
    kvs_segment_retire(&m);
    assert_int_equal(m.fd, -1);
    assert_int_equal(m.wlock_fd, -1);
    assert_int_equal(((uint8_t *)m.base)[100], 0);         /* zero pages now */
    ((uint8_t *)m.base)[200] = 9;                          /* lands nowhere */
    assert_int_equal(((uint8_t *)s.base)[200], 7);
    assert_int_equal(kvs_segment_fence(&s, 2), KVS_OK);    /* the lock went with the fd */
    kvs_segment_write_end(&m, 1);                          /* nothing to unlock */
    assert_int_equal(kvs_segment_write_begin(&m, 2), KVS_ERR_UNAVAILABLE);
    kvs_segment_destroy(&m);
    kvs_segment_destroy(&s);
    unsetenv("KVSHELF_PREFAULT");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_map_destroy),
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_identity),
        cmocka_unit_test(test_fence),
        cmocka_unit_test(test_fork_child_holds_no_lock),
        cmocka_unit_test(test_retire_closes),
        cmocka_unit_test(test_many_and_large),
        cmocka_unit_test(test_gc),
        cmocka_unit_test(test_prefault),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
