/* The busy guard: close() waits for the calls still running without the GIL
 * (they count themselves in the object's `busy`), releasing the GIL while it
 * waits so that they can finish. */
#include "ext.h"

#include <time.h>

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

void wait_not_busy(volatile int *busy) {
    while (*busy > 0) {
        Py_BEGIN_ALLOW_THREADS
        sleep_ms(1);
        Py_END_ALLOW_THREADS
    }
}
