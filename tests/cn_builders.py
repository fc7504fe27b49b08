"""Builders for tests of the Linux sources: raw proc connector messages in the kernel's exact shape, and small
C programs that storm the kernel with forks, execs and threads whose ids they report (the ground truth).

The layouts are written out here independently of ``etwmon.sources.netlink`` (from ``include/uapi/linux/
connector.h`` and ``cn_proc.h``), so a mistake in the library's parser does not hide in its own tests.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

NLMSG_DONE = 3
CN_IDX_PROC = CN_VAL_PROC = 1

NONE, FORK, EXEC, UID, GID, SID, PTRACE, COMM = 0, 0x1, 0x2, 0x4, 0x40, 0x80, 0x100, 0x200
NONZERO_EXIT, COREDUMP, EXIT = 0x20000000, 0x40000000, 0x80000000


def nlmsghdr(length: int, type_: int = NLMSG_DONE, flags: int = 0, seq: int = 0, pid: int = 0) -> bytes:
    """struct nlmsghdr: __u32 nlmsg_len; __u16 nlmsg_type, nlmsg_flags; __u32 nlmsg_seq, nlmsg_pid."""
    return struct.pack("=IHHII", length, type_, flags, seq, pid)


def cn_msg(seq: int, data: bytes, ack: int = 0, idx: int = CN_IDX_PROC, val: int = CN_VAL_PROC,
           length: int | None = None) -> bytes:
    """struct cn_msg: struct cb_id { __u32 idx, val; } id; __u32 seq, ack; __u16 len, flags; __u8 data[]."""
    return struct.pack("=IIIIHH", idx, val, seq, ack, len(data) if length is None else length, 0) + data


def proc_event(what: int, cpu: int, timestamp_ns: int, *union: int, comm: bytes | None = None) -> bytes:
    """struct proc_event: what, cpu, __u64 timestamp_ns (aligned 8), then a 24-byte union of __u32 fields
    (or, for COMM, two pids and char comm[16])."""
    head = struct.pack("=IIQ", what, cpu, timestamp_ns)
    if comm is not None:
        body = struct.pack("=ii", *union[:2]) + comm[:16].ljust(16, b"\0")
    else:
        body = struct.pack(f"={len(union)}I", *(u & 0xFFFFFFFF for u in union)).ljust(24, b"\0")
    return head + body


def message(seq: int, event: bytes, *, ack: int = 0, idx: int = CN_IDX_PROC, val: int = CN_VAL_PROC) -> bytes:
    """One whole netlink message as the kernel's cn_netlink_send builds it (76 bytes for a proc_event)."""
    body = cn_msg(seq, event, ack=ack, idx=idx, val=val)
    return nlmsghdr(16 + len(body)) + body


def fork(seq: int, cpu: int, ts: int, parent_pid: int, parent_tgid: int, child_pid: int, child_tgid: int) -> bytes:
    return message(seq, proc_event(FORK, cpu, ts, parent_pid, parent_tgid, child_pid, child_tgid))


def exec_(seq: int, cpu: int, ts: int, pid: int, tgid: int) -> bytes:
    return message(seq, proc_event(EXEC, cpu, ts, pid, tgid))


def exit_(seq: int, cpu: int, ts: int, pid: int, tgid: int, exit_code: int, exit_signal: int = 17,
          parent_pid: int = 1, parent_tgid: int = 1) -> bytes:
    """An EXIT event; ``exit_code`` is the kernel's raw task->exit_code (a wait status)."""
    return message(seq, proc_event(EXIT, cpu, ts, pid, tgid, exit_code, exit_signal, parent_pid, parent_tgid))


def comm(seq: int, cpu: int, ts: int, pid: int, tgid: int, name: bytes) -> bytes:
    return message(seq, proc_event(COMM, cpu, ts, pid, tgid, comm=name))


def ack(seq: int, cpu: int, ts: int, ack_: int, err: int = 0) -> bytes:
    """The kernel's answer to LISTEN/IGNORE: what = NONE, ack = the request's ack + 1, err in the union."""
    return message(seq, proc_event(NONE, cpu, ts, err), ack=ack_)


def wait_status_exited(code: int) -> int:
    """task->exit_code of a process that called exit(code)."""
    return (code & 0xFF) << 8


def wait_status_signaled(signal: int, core: bool = False) -> int:
    """task->exit_code of a process killed by ``signal``."""
    return signal | (0x80 if core else 0)


# --- storm generators ----------------------------------------------------------------------------------------

#: forkexec N CONCURRENCY PROGRAM ARG...: N children, at most CONCURRENCY alive at once, each exec'ing
#: PROGRAM ARG... with "%d" in an argument replaced by the child's index. Prints its own pid, then one line
#: "index pid" per child, after all have been reaped (so printing does not slow the storm).
FORKEXEC_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: forkexec N CONC PROGRAM [ARG...]\n"); return 2; }
    long n = atol(argv[1]), conc = atol(argv[2]), alive = 0;
    pid_t *pids = calloc(n, sizeof *pids);
    int nargs = argc - 3;
    for (long i = 0; i < n; i++) {
        if (alive >= conc) { if (wait(NULL) > 0) alive--; }
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) {
            char **av = calloc(nargs + 1, sizeof *av);
            for (int k = 0; k < nargs; k++) {
                const char *a = argv[3 + k];
                if (strstr(a, "%d")) { av[k] = malloc(strlen(a) + 24); sprintf(av[k], a, (int)i); }
                else av[k] = (char *)a;
            }
            execv(av[0], av);
            _exit(127);
        }
        pids[i] = pid;
        alive++;
    }
    while (wait(NULL) > 0) {}
    printf("%d\n", (int)getpid());
    for (long i = 0; i < n; i++) printf("%ld %d\n", i, (int)pids[i]);
    return 0;
}
"""

#: threads N BATCH: N threads, BATCH at a time (created, then joined), each noting its tid. Prints its pid,
#: then every tid in creation order.
THREADS_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
static void *body(void *arg) { *(pid_t *)arg = (pid_t)syscall(SYS_gettid); return NULL; }
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000, batch = argc > 2 ? atol(argv[2]) : 64;
    pid_t *tids = calloc(n, sizeof *tids);
    pthread_t *th = calloc(batch, sizeof *th);
    for (long i = 0; i < n; i += batch) {
        long k = n - i < batch ? n - i : batch;
        for (long j = 0; j < k; j++)
            if (pthread_create(&th[j], NULL, body, &tids[i + j])) { perror("pthread_create"); return 1; }
        for (long j = 0; j < k; j++) pthread_join(th[j], NULL);
    }
    printf("%d\n", (int)getpid());
    for (long i = 0; i < n; i++) printf("%d\n", (int)tids[i]);
    return 0;
}
"""

#: forks N: N children by fork() without exec, each exiting at once with status (index % 200); prints its
#: pid, then "pid status" per child.
FORKS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/wait.h>
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100;
    pid_t *pids = calloc(n, sizeof *pids);
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) { perror("fork"); return 1; }
        if (pid == 0) _exit((int)(i % 200));
        pids[i] = pid;
        waitpid(pid, NULL, 0);
    }
    printf("%d\n", (int)getpid());
    for (long i = 0; i < n; i++) printf("%d %ld\n", (int)pids[i], i % 200);
    return 0;
}
"""

STORM_SOURCES = {"forkexec": FORKEXEC_C, "threads": THREADS_C, "forks": FORKS_C}


def compile_storm_tools(directory: os.PathLike | str) -> dict[str, Path] | None:
    """Compile the storm generators into ``directory``; None when no C compiler is installed."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = {}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in STORM_SOURCES.items():
        src = directory / f"{name}.c"
        exe = directory / name
        src.write_text(source)
        subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(src)], check=True, capture_output=True)
        out[name] = exe
    return out


# --- an independent reader, for a reference listener in tests ---------------------------------------------------

def read_events(buf, n: int) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """(cpu, seq, what, six union words) of every proc connector message in the first ``n`` bytes."""
    out = []
    offset = 0
    while offset + 16 <= n:
        length, = struct.unpack_from("=I", buf, offset)
        if length < 16 or offset + length > n:
            break
        if length >= 16 + 20 + 40:
            idx, val, seq = struct.unpack_from("=III", buf, offset + 16)
            if (idx, val) == (CN_IDX_PROC, CN_VAL_PROC):
                what, cpu, _ = struct.unpack_from("=IIQ", buf, offset + 36)
                out.append((cpu, seq, what, struct.unpack_from("=6I", buf, offset + 52)))
        offset += (length + 3) & ~3
    return out
