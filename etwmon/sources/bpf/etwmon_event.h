/* The event the etwmon eBPF program writes into its ring buffer: the one layout shared by the kernel side
 * (etwmon.bpf.c) and the Python reader (etwmon/sources/bpf/_event.py mirrors it; tests/test_bpf.py checks the
 * mirror against this struct's BTF in the committed object).
 *
 * One event per kernel tracepoint hit. Small events (thread create, exits) are the fixed part only;
 * process creates and execs add a variable tail: argv (argv_len bytes, the raw NUL-separated strings from
 * the task's mm), then filename_len bytes of bprm->filename (exec only), exe_len bytes of the executable's
 * path, cwd_len bytes of the working directory, cgroup_len bytes of the cgroup path. No strings are
 * NUL-terminated in the tail. sizeof is a multiple of 8, so the tail starts right after the fixed part. Fields are only ever appended (after tty).
 */
#ifndef ETWMON_EVENT_H
#define ETWMON_EVENT_H

/* What happened (etwmon_event.kind): from ETWMON_KIND_BASE up, so that no kind reads as a wire record's Type. */
#define ETWMON_FORK_PROCESS 0x101  /* a new process (child pid == tgid) */
#define ETWMON_FORK_THREAD 0x102   /* a new thread in an existing process */
#define ETWMON_EXEC 0x103          /* a successful exec: the process runs a new program */
#define ETWMON_EXIT_THREAD 0x104   /* a thread ended and the process lives on */
#define ETWMON_EXIT_PROCESS 0x105  /* the last thread of a process ended (the tracepoint's group_dead, or
                                * signal->live at 0 on kernels whose tracepoint does not pass it) */

/* Quality flags (etwmon_event.flags). */
#define ETWMON_ARGV_TRUNCATED 0x0001  /* argv was longer than ETWMON_ARGV_MAX: the tail holds its first bytes */
#define ETWMON_ARGV_FAULT 0x0002      /* argv could not be read (pages not present); the tail holds none */
#define ETWMON_NO_MM 0x0004           /* a kernel thread: no argv at all */
#define ETWMON_EXE_TRUNCATED 0x0008   /* the exe path is cut (deeper than the walk or longer than its buffer) */
#define ETWMON_CWD_TRUNCATED 0x0010   /* likewise for the working directory */
#define ETWMON_LEADER_REPLACED 0x0020 /* EXIT_THREAD of the old leader during a non-leader thread's exec: tid is
                                       * the thread id that goes away (the exec'ing thread takes the leader's) */
#define ETWMON_FILENAME_TRUNCATED 0x0040
#define ETWMON_NO_TTY 0x0080          /* no controlling terminal (tty is empty) */
#define ETWMON_CGROUP_TRUNCATED 0x0100 /* the cgroup path is too deep or too long: the tail holds none */
#define ETWMON_CGROUP_V1 0x0200       /* the cgroup path is a v1 hierarchy's (the task is at the v2 root) */

/* What the executable file is (etwmon_event.exe_flags; exe_dev and exe_ino say which file it is). */
#define ETWMON_EXE_KNOWN 0x01   /* the task has an executable (mm->exe_file): exe_dev, exe_ino, the bits below */
#define ETWMON_EXE_MEMFD 0x02   /* an anonymous memory file (memfd_create; "memfd:" on tmpfs or hugetlbfs) */
#define ETWMON_EXE_DELETED 0x04 /* no name left in any directory (i_nlink == 0) */
#define ETWMON_EXE_SETUID 0x08  /* the file's set-user-ID bit */
#define ETWMON_EXE_SETGID 0x10  /* the file's set-group-ID bit (with group execute) */

#define ETWMON_ARGV_MAX 32768   /* bytes of argv read: more than a record's 32,747 UTF-16 code units can hold */
#define ETWMON_PATH_MAX 4096    /* bytes of each path (filename, exe, cwd) */
#define ETWMON_PATH_DEPTH 32    /* path components walked up from a dentry */

struct etwmon_event {
	__u16 kind;            /* ETWMON_* above */
	__u16 flags;           /* ETWMON_ARGV_TRUNCATED, ... */
	__u32 size;            /* bytes of this event, fixed part and tail */
	__u64 time_ns;         /* bpf_ktime_get_boot_ns() at the event: CLOCK_BOOTTIME */
	__u32 pid;             /* tgid of the process the event is about */
	__u32 tid;             /* the thread the event is about */
	__u32 ppid;            /* tgid of its real parent */
	__u32 creating_pid;    /* tgid of the task that caused it (the forking or exec'ing one) */
	__u32 creating_tid;    /* its thread id (at exec: the id it had before exec, the tracepoint's old_pid) */
	__u32 exit_code;       /* exits: the raw wait status (exit status << 8 | signal) */
	__u64 start_boottime;  /* task->start_boottime, ns since boot (as /proc/<pid>/stat's starttime) */
	__u64 parent_start_boottime;
	__u64 cgroup_id;       /* the task's cgroup v2 id (kernfs node id; what bpf_get_current_cgroup_id gives) */
	__u32 uid, euid, gid, egid;  /* real and effective ids, in the initial user namespace */
	__u32 loginuid;        /* audit login uid; 4294967295 when unset */
	__u32 sessionid;       /* audit session id; 4294967295 when unset */
	__u32 argv_len;        /* bytes of argv in the tail */
	__u32 argv_full_len;   /* arg_end - arg_start: bytes argv really has */
	__u16 filename_len;    /* bytes of bprm->filename in the tail (exec only) */
	__u16 exe_len;         /* bytes of the executable's path in the tail */
	__u16 cwd_len;         /* bytes of the working directory in the tail */
	__u16 reserved;
	char comm[16];         /* task->comm, NUL-padded */
	char tty[32];          /* name of the controlling tty (e.g. "pts3"), NUL-padded; empty when none */
	__u64 exe_ino;         /* the executable's inode number (forks and execs; 0 when exe_flags is 0) */
	__u32 exe_dev;         /* its device as the kernel numbers it inside (major << 20 | minor; not st_dev) */
	__u32 exe_flags;       /* ETWMON_EXE_* */
	__u32 mnt_ns;          /* inode number of the task's mount namespace (/proc/<pid>/ns/mnt); 0 if unknown */
	__u32 pid_ns;          /* inode number of its pid namespace (/proc/<pid>/ns/pid); 0 if unknown */
	__u32 ns_pid;          /* the process id (tgid) as its own pid namespace numbers it */
	__u16 cgroup_len;      /* bytes of the cgroup path in the tail (etwmon_cgroup.h says which hierarchy) */
	__u16 reserved2;
	/* the tail follows: argv, filename, exe, cwd, cgroup (see above) */
};

/* The loader's settings, in the one-entry array map `config`, written after load and before attach. */
#define ETWMON_CONFIG_WIRE 0x1     /* thread records and process exits are written as etwmon's wire records */
#define ETWMON_CONFIG_IDENTITY 0x2 /* ... with the extension block (ProcessGuid; StartTime, Lifetime, Image) */
#define ETWMON_CONFIG_CREATES 0x4  /* ... and process creates and execs too (with WIRE) */

struct etwmon_config {
	__u64 filetime_base;   /* FILETIME = (CLOCK_BOOTTIME ns + filetime_base) / 100 */
	__u8 guid_prefix[8];   /* the host and boot tags of every ProcessGuid (etwmon.identity.guid_prefix) */
	__u32 flags;           /* ETWMON_CONFIG_* */
	__u32 wake_us;         /* wake the reader this long after the first record it has not seen (0: the ring's
	                        * adaptive rule, a wake-up whenever it has caught up); ignored without the pacer */
};

/* Wire records the kernel writes itself (etwmon/records.py; all little-endian, sizes in bytes):
 *   ThreadCreate  Type 3, Size 24 (52 with the block): ItemHeader | ThreadId @16 | ProcessId @20
 *   ThreadExit    Type 4, Size 32 (60): ... | ExitCode @24 | 4 bytes of padding
 *   ProcessExit   Type 2, Size 24 (+ block): ItemHeader | ProcessId @16 | ExitCode @20
 *   ItemHeader: Type (s16) @0, Size (u16) @2, 4 bytes of padding, Time (s64 FILETIME) @8
 *   block: Version 1 (u16), Length (u16, header included), Flags (u32) 0, then Tag (u16), Length (u16), value:
 *     threads: ProcessGuid (1, 16 bytes)
 *     process exit: ProcessGuid (1), StartTime (14, s64 FILETIME), Lifetime (15, u64 us), Image (3, UTF-16LE,
 *     when the path is known and ASCII; otherwise the exit comes as an etwmon_event for user space to write)
 *   ProcessCreate Type 1 (fork), ProcessExec Type 101: ItemHeader | ProcessId @16 | ParentProcessId @20 |
 *     CreatingThreadId @24 | CreatingProcessId @28 | CommandLineLength @32 (code units) | CommandLine @34
 *     (UTF-16LE) | NUL and 4 bytes of padding | block: ProcessGuid (1), ParentProcessGuid (2), Uid (5),
 *     StartTime (14), ExeDevice..CgroupId (17-23, those known), Image (3), CurrentDirectory (4), Tty (10),
 *     Cgroup (12), ParentImage (7: the real parent's executable path; a fork by the parent copies Image); when
 *     argv, a path or the tty is not ASCII, argv was cut or unreadable, or the record would not fit, the event
 *     comes as an etwmon_event instead
 * A wire record is told from an etwmon_event by its first 16 bits: wire Types are below ETWMON_KIND_BASE. */
#define ETWMON_KIND_BASE 0x100

#endif /* ETWMON_EVENT_H */
