/* Shared by the storm generators: argument parsing, pacing to a target rate, and the report.
 *
 * Usage: <generator> N RATE [SECONDS]
 *   N        items to create (processes or threads); 0 = no limit, stop after SECONDS
 *   RATE     items per second; 0 = as fast as the machine goes (unthrottled)
 *   SECONDS  stop after this long even if N is not reached (default: no limit)
 * Report on stdout after the storm, so writing it costs nothing during the storm:
 *   "items <n> failed <f> elapsed_ns <ns> start_ns <CLOCK_REALTIME> end_ns <CLOCK_REALTIME>"
 *   then one created pid/tid per line (only when N > 0).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct storm {
    long n;           /* items wanted (0: until the time limit) */
    double rate;      /* items/s, 0: unthrottled */
    long long limit;  /* ns, 0: none */
    long long t0;     /* CLOCK_MONOTONIC at the start */
    long long wall0;  /* CLOCK_REALTIME at the start */
    int *ids;         /* created pids/tids, n of them */
    long done, failed;
};

static inline long long clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void storm_init(struct storm *s, int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s N RATE [SECONDS]\n", argv[0]);
        exit(2);
    }
    s->n = atol(argv[1]);
    s->rate = atof(argv[2]);
    s->limit = argc > 3 ? (long long)(atof(argv[3]) * 1e9) : 0;
    if (s->n <= 0 && s->limit <= 0) {
        fprintf(stderr, "%s: give N > 0 or a time limit\n", argv[0]);
        exit(2);
    }
    s->ids = s->n > 0 ? calloc(s->n, sizeof(int)) : NULL;
    s->done = s->failed = 0;
    s->wall0 = clock_ns(CLOCK_REALTIME);
    s->t0 = clock_ns(CLOCK_MONOTONIC);
}

/* True while item number s->done should be made; sleeps first when ahead of the rate's schedule. */
static inline int storm_next(struct storm *s)
{
    if (s->n > 0 && s->done >= s->n)
        return 0;
    long long now = clock_ns(CLOCK_MONOTONIC);
    if (s->limit > 0 && now - s->t0 >= s->limit)
        return 0;
    if (s->rate > 0) {
        long long due = s->t0 + (long long)(s->done * 1e9 / s->rate);
        /* Sleep only when at least 0.2 ms ahead: shorter sleeps cost more than they pace, so fast
         * rates come in small bursts that average to the rate. */
        if (due - now > 200000) {
            struct timespec ts = {due / 1000000000LL, due % 1000000000LL};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        }
    }
    return 1;
}

static inline void storm_record(struct storm *s, int id)
{
    if (s->ids)
        s->ids[s->done] = id;
    s->done++;
}

static inline void storm_report(struct storm *s)
{
    long long elapsed = clock_ns(CLOCK_MONOTONIC) - s->t0;
    long long wall1 = clock_ns(CLOCK_REALTIME);
    printf("items %ld failed %ld elapsed_ns %lld start_ns %lld end_ns %lld\n",
           s->done, s->failed, elapsed, s->wall0, wall1);
    if (s->ids)
        for (long i = 0; i < s->done; i++)
            printf("%d\n", s->ids[i]);
    fflush(stdout);
}
