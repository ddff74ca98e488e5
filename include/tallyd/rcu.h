/*
 * rcu.h — the one place that picks tallyd's liburcu flavour.
 *
 * tallyd uses the "memb" flavour (urcu-memb): readers need no signals and no
 * quiescent-state reports, at the cost of a memory barrier per
 * rcu_read_lock(). Every thread that reads or writes the entity table must
 * call tly_rcu_thread_online() before its first access and
 * tly_rcu_thread_offline() before it exits.
 */
#ifndef TALLYD_RCU_H
#define TALLYD_RCU_H

#include <urcu/urcu-memb.h>

/* Registers the calling thread with RCU. */
static inline void tly_rcu_thread_online(void)
{
    urcu_memb_register_thread();
}

/* Unregisters the calling thread from RCU. */
static inline void tly_rcu_thread_offline(void)
{
    urcu_memb_unregister_thread();
}

/*
 * ThreadSanitizer cannot see liburcu's grace periods (the library is not
 * instrumented), so under TSan every read-side unlock and every call_rcu
 * releases a sync object that each deferred-free callback acquires before it
 * frees: the happens-before edge the grace period really provides. Without
 * TSan these annotations compile to nothing.
 */
#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
extern char tly_rcu_tsan_sync;
extern char tly_table_tsan_sync;
#define tly_rcu_tsan_release() __tsan_release(&tly_rcu_tsan_sync)
#define tly_rcu_tsan_acquire() __tsan_acquire(&tly_rcu_tsan_sync)
/* Likewise for records published in the (uninstrumented) entity table:
 * publish before linking a record, subscribe after finding one. */
#define tly_tsan_publish()   __tsan_release(&tly_table_tsan_sync)
#define tly_tsan_subscribe() __tsan_acquire(&tly_table_tsan_sync)
#else
#define tly_rcu_tsan_release() ((void)0)
#define tly_rcu_tsan_acquire() ((void)0)
#define tly_tsan_publish()     ((void)0)
#define tly_tsan_subscribe()   ((void)0)
#endif

/*
 * Read-side sections nest (an apply inside a writer's section over a whole
 * batch). The nesting is counted here, in the caller's thread: only the
 * outermost lock and unlock call liburcu, whose own calls go through the
 * shared library's thread-local lookup (about 12 instructions each) even
 * when nested. A thread's count is its own; liburcu sees the same outermost
 * section it would have counted itself.
 */
extern _Thread_local unsigned tly_rcu_depth;

static inline void tly_rcu_read_lock(void)
{
    if (tly_rcu_depth++ == 0)
        urcu_memb_read_lock();
}

static inline void tly_rcu_read_unlock(void)
{
    tly_rcu_tsan_release();
    if (--tly_rcu_depth == 0)
        urcu_memb_read_unlock();
}

/* Defers fn(head) past a grace period; fn must start with
 * tly_rcu_tsan_acquire(). */
#define tly_call_rcu(head, fn)                                                                     \
    do {                                                                                           \
        tly_rcu_tsan_release();                                                                    \
        urcu_memb_call_rcu((head), (fn));                                                          \
    } while (0)
#define tly_rcu_barrier()     urcu_memb_barrier()
#define tly_synchronize_rcu() urcu_memb_synchronize_rcu()

#endif
