/*
 * rdkafka_tsan.h — unit tests that run librdkafka, under ThreadSanitizer.
 *
 * librdkafka starts its threads with C11 thrd_create, which glibc routes
 * around the pthread_create ThreadSanitizer intercepts; TSan then crashes
 * inside those threads (in its allocator). Under TSan (`make tsan`) the
 * tests that run librdkafka are skipped, and counted as skipped; the code
 * they cover synchronises by plain atomics and mutexes, which the other
 * TSan tests exercise. Include after <cmocka.h>.
 */
#ifndef TALLYD_TEST_RDKAFKA_TSAN_H
#define TALLYD_TEST_RDKAFKA_TSAN_H

#if defined(__SANITIZE_THREAD__)
#define SKIP_UNDER_TSAN() skip()
#else
#define SKIP_UNDER_TSAN() ((void)0)
#endif

#endif
