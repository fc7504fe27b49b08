/* Exec storm: fork, then exec `/bin/true storm-<i>` in the child, and reap it; one item = one process
 * (three kernel events: fork, exec, exit). Prints the child pids (see storm.h). */
#include "storm.h"
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    struct storm s;
    storm_init(&s, argc, argv);
    char arg[32];
    while (storm_next(&s)) {
        snprintf(arg, sizeof arg, "storm-%ld", s.done);  /* built before fork: the child only execs */
        pid_t pid = fork();
        if (pid == 0) {
            execl("/bin/true", "/bin/true", arg, (char *)NULL);
            _exit(127);
        }
        if (pid < 0) {
            s.failed++;
            continue;
        }
        int status;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            s.failed++;
        storm_record(&s, pid);
    }
    storm_report(&s);
    return 0;
}
