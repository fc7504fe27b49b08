/* Thread storm: pthread_create a thread that returns at once, then join it; one item = one thread (two
 * kernel events: clone, exit). Each thread stores its own tid; prints the tids (see storm.h). */
#include "storm.h"
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

static void *note_tid(void *slot)
{
    *(int *)slot = (int)syscall(SYS_gettid);
    return NULL;
}

int main(int argc, char **argv)
{
    struct storm s;
    storm_init(&s, argc, argv);
    int scratch;
    while (storm_next(&s)) {
        pthread_t t;
        int *slot = s.ids ? &s.ids[s.done] : &scratch;
        if (pthread_create(&t, NULL, note_tid, slot) != 0) {
            s.failed++;
            continue;
        }
        pthread_join(t, NULL);
        s.done++;
    }
    storm_report(&s);
    return 0;
}
