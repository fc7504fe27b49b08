/* Fork storm: fork a child that exits at once, and reap it; one item = one process (two kernel events:
 * fork, exit). Prints the child pids (see storm.h). */
#include "storm.h"
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct storm s;
    storm_init(&s, argc, argv);
    while (storm_next(&s)) {
        pid_t pid = fork();
        if (pid == 0)
            _exit(0);
        if (pid < 0) {
            s.failed++;
            continue;
        }
        waitpid(pid, NULL, 0);
        storm_record(&s, pid);
    }
    storm_report(&s);
    return 0;
}
