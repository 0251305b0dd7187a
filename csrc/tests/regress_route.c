/* route.c for csrc/tests/regress.c: the writers' unlock goes through the scenario's hook, so a
 * second writer can run at the one moment that matters (right after the first one unlocks). */
#include <pthread.h>

int fz_mutex_unlock(pthread_mutex_t *m);
#define pthread_mutex_unlock fz_mutex_unlock
#include "route.c"
