// SPDX-License-Identifier: GPL-2.0
/* etwmon's kernel side: one event per process fork, thread create, exec and exit, written into one BPF ring
 * buffer at the moment the kernel does it, with the exact argv read from the task's own memory (what the
 * book's driver does in its process-notify routine). Loaded by etwmon/sources/bpf/__init__.py; the layout
 * of an event is etwmon_event.h. Rebuild with build.sh (a reproducible build: see docs/linux.md).
 *
 * tp_btf programs: the tracepoint arguments are typed kernel pointers, read with CO-RE relocations so one
 * object runs on every kernel with BTF. Nothing here changes kernel state; every event that cannot be
 * written (ring full) is counted per CPU in `lost`, which the reader turns into RecordsLost.
 */
#include "etwmon_kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "etwmon_event.h"
#include "etwmon_cgroup.h"

char LICENSE[] SEC("license") = "GPL";

/* The tail is built at offsets masked with TAIL_MASK, each piece at most ETWMON_ARGV_MAX (argv) or
 * ETWMON_PATH_MAX long; the room below makes every masked write provably inside the buffer. */
#define TAIL_MASK 0xFFFF
#define TAIL_ROOM (TAIL_MASK + 1 + ETWMON_ARGV_MAX)
#define NAME_MAX 255

/* A wire record the kernel writes itself (a thread record or a process exit, see etwmon_event.h) is built in
 * `wire`: the fixed part, the block, and the image path widened to UTF-16 (two bytes per path byte). */
#define WIRE_SIZE 16384
#define WIRE_MASK (WIRE_SIZE - 1)

struct scratch {
	struct etwmon_event e;
	char tail[TAIL_ROOM];
	char path[ETWMON_PATH_MAX + NAME_MAX + 1]; /* a path is built here backwards, then copied to the tail */
	__u8 wire[WIRE_SIZE];
};

/* One scratch buffer per CPU (an event is too big for the BPF stack and for a per-CPU array's 32 KiB
 * value limit); the loader sets max_entries to the number of possible CPUs. Tracepoint programs run with
 * preemption off, so a CPU's buffer is used by one program at a time. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* The events, in the order they were reserved. The loader sets the size (a power of two of pages). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

/* The loader's settings (struct etwmon_config), written once after load and before attach. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct etwmon_config);
} config SEC(".maps");

/* Events that could not be written (ring full), per CPU: the reader sums them. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/* Wake-ups: with flags 0 the ring wakes the reader only when it has caught up (the adaptive rule of
 * bpf_ringbuf_output); the reader then waits a moment before draining, so one wake-up serves a batch. */
#define OUTPUT_FLAGS 0

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&lost, &zero);

	if (n)
		*n += 1;
}

static __always_inline struct scratch *scratch_buffer(void)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct scratch *s = bpf_map_lookup_elem(&scratch, &cpu);

	if (!s)
		count_lost(); /* cannot happen when max_entries covers every CPU; counted if it does */
	return s;
}

static __always_inline void emit(struct scratch *s, __u32 tail_len)
{
	__u64 size = sizeof(struct etwmon_event) + (tail_len & TAIL_MASK);

	s->e.size = size;
	if (bpf_ringbuf_output(&events, &s->e, size, OUTPUT_FLAGS))
		count_lost();
}

/* The task's mount and pid namespaces and its process id in the latter (the leader's pid struct numbers the
 * process; level is how deep the namespace is nested). */
static __always_inline void read_namespaces(struct etwmon_event *e, struct task_struct *task)
{
	struct pid *pid = BPF_CORE_READ(task, group_leader, thread_pid);
	unsigned int level = BPF_CORE_READ(pid, level);
	struct upid up = {};

	e->mnt_ns = BPF_CORE_READ(task, nsproxy, mnt_ns, ns.inum); /* 0 when nsproxy is gone (late in exit) */
	bpf_core_read(&up, sizeof(up), &pid->numbers[level & 31]);
	e->ns_pid = up.nr;
	e->pid_ns = BPF_CORE_READ(up.ns, ns.inum);
}

#define TMPFS_MAGIC 0x01021994
#define HUGETLBFS_MAGIC 0x958458f6
#define S_ISUID 04000
#define S_ISGID 02000
#define S_IXGRP 00010

/* Which file `exe` is (device, inode) and what kind: memfd, deleted, set-id (cheap reads, no path walk). */
static __always_inline void read_exe_identity(struct etwmon_event *e, struct file *exe)
{
	struct inode *inode = BPF_CORE_READ(exe, f_inode);
	struct super_block *sb = BPF_CORE_READ(inode, i_sb);
	unsigned long magic = BPF_CORE_READ(sb, s_magic);
	unsigned short mode = BPF_CORE_READ(inode, i_mode);
	char name[6] = {};
	__u32 flags = ETWMON_EXE_KNOWN;

	e->exe_ino = BPF_CORE_READ(inode, i_ino);
	e->exe_dev = BPF_CORE_READ(sb, s_dev);
	if (BPF_CORE_READ(inode, i_nlink) == 0)
		flags |= ETWMON_EXE_DELETED;
	if (mode & S_ISUID)
		flags |= ETWMON_EXE_SETUID;
	if ((mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP))
		flags |= ETWMON_EXE_SETGID;
	if (magic == TMPFS_MAGIC || magic == HUGETLBFS_MAGIC) {
		bpf_probe_read_kernel(name, sizeof(name), BPF_CORE_READ(exe, f_path.dentry, d_name.name));
		if (name[0] == 'm' && name[1] == 'e' && name[2] == 'm' && name[3] == 'f' && name[4] == 'd' &&
		    name[5] == ':')
			flags |= ETWMON_EXE_MEMFD;
	}
	e->exe_flags = flags;
}

/* The fields every event carries about `task`. */
static __always_inline void fill(struct etwmon_event *e, __u16 kind, struct task_struct *task)
{
	const struct cred *cred = BPF_CORE_READ(task, real_cred);
	struct task_struct *parent = BPF_CORE_READ(task, real_parent);

	e->kind = kind;
	e->flags = 0;
	e->time_ns = bpf_ktime_get_boot_ns();
	e->pid = BPF_CORE_READ(task, tgid);
	e->tid = BPF_CORE_READ(task, pid);
	e->ppid = BPF_CORE_READ(parent, tgid);
	e->creating_pid = 0;
	e->creating_tid = 0;
	e->exit_code = 0;
	e->start_boottime = BPF_CORE_READ(task, start_boottime);
	e->parent_start_boottime = BPF_CORE_READ(parent, start_boottime);
	e->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	e->uid = BPF_CORE_READ(cred, uid.val);
	e->gid = BPF_CORE_READ(cred, gid.val);
	e->euid = BPF_CORE_READ(cred, euid.val);
	e->egid = BPF_CORE_READ(cred, egid.val);
	if (bpf_core_field_exists(task->loginuid)) {
		e->loginuid = BPF_CORE_READ(task, loginuid.val);
		e->sessionid = BPF_CORE_READ(task, sessionid);
	} else {
		e->loginuid = e->sessionid = 0xFFFFFFFF;
	}
	e->argv_len = e->argv_full_len = 0;
	e->filename_len = e->exe_len = e->cwd_len = 0;
	e->reserved = 0;
	BPF_CORE_READ_INTO(&e->comm, task, comm);
	e->exe_ino = 0;
	e->exe_dev = e->exe_flags = 0;
	e->cgroup_len = e->reserved2 = 0;
	read_namespaces(e, task);
}

/* argv of `task` (whose memory is current's) into the tail at 0; returns its length. */
static __always_inline __u32 read_argv(struct scratch *s, struct task_struct *task)
{
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	unsigned long start, end;
	__u64 full;
	__u32 len;

	if (!mm) {
		s->e.flags |= ETWMON_NO_MM;
		return 0;
	}
	start = BPF_CORE_READ(mm, arg_start);
	end = BPF_CORE_READ(mm, arg_end);
	full = end > start ? end - start : 0;
	s->e.argv_full_len = full > 0xFFFFFFFF ? 0xFFFFFFFF : full;
	len = full;
	if (full > ETWMON_ARGV_MAX) {
		len = ETWMON_ARGV_MAX;
		s->e.flags |= ETWMON_ARGV_TRUNCATED;
	}
	barrier_var(len);
	if (len > ETWMON_ARGV_MAX)
		return 0;
	if (bpf_probe_read_user(s->tail, len, (const void *)start)) {
		s->e.flags |= ETWMON_ARGV_FAULT;
		return 0;
	}
	s->e.argv_len = len;
	return len;
}

/* A walk from a dentry up to the root of its mount namespace, one component per bpf_loop step (a loop in
 * one program would make the verifier follow every mix of mount crossings and names: too many states). */
struct walk {
	struct scratch *s;
	struct dentry *dentry;
	struct vfsmount *vfsmnt;
	struct mount *mnt;
	__u32 pos; /* the path so far is s->path[pos..ETWMON_PATH_MAX) */
	__u32 end; /* 1: reached the root; 2: too long (truncated) */
};

static long path_step(__u32 index, void *arg)
{
	struct walk *w = arg;
	struct scratch *s = w->s;
	struct dentry *dentry = w->dentry;
	struct vfsmount *vfsmnt = w->vfsmnt; /* locals: BPF_CORE_READ must see only kernel types */
	struct mount *mnt = w->mnt;
	struct dentry *parent;
	const unsigned char *name;
	__u32 len, pos;

	if (dentry == BPF_CORE_READ(vfsmnt, mnt_root)) {
		struct mount *up = BPF_CORE_READ(mnt, mnt_parent);

		if (up == mnt) {
			w->end = 1; /* the root of the namespace */
			return 1;
		}
		w->dentry = BPF_CORE_READ(mnt, mnt_mountpoint); /* cross to the mount it sits on */
		w->mnt = up;
		w->vfsmnt = &up->mnt;
		return 0;
	}
	parent = BPF_CORE_READ(dentry, d_parent);
	if (dentry == parent) {
		w->end = 1; /* the root of a filesystem that is not mounted here (pipes, deleted mounts) */
		return 1;
	}
	len = BPF_CORE_READ(dentry, d_name.len);
	name = BPF_CORE_READ(dentry, d_name.name);
	pos = w->pos;
	if (len > NAME_MAX || len + 1 >= pos) {
		w->end = 2;
		return 1;
	}
	pos -= len;
	bpf_probe_read_kernel(&s->path[pos & (ETWMON_PATH_MAX - 1)], len & NAME_MAX, name);
	pos -= 1;
	s->path[pos & (ETWMON_PATH_MAX - 1)] = '/';
	w->pos = pos;
	w->dentry = parent;
	return 0;
}

/* The path of (dentry, vfsmnt) up to the root of its mount namespace, written at `off` in the tail; returns
 * its length (0 and `trunc_flag` set when it does not fit in ETWMON_PATH_DEPTH components or
 * ETWMON_PATH_MAX bytes). bpf_d_path is not allowed in tp_btf programs: this is d_path's walk, bounded. */
static __always_inline __u32 read_path(struct scratch *s, __u32 off, struct dentry *dentry,
				       struct vfsmount *vfsmnt, __u16 trunc_flag)
{
	struct walk w = {
		.s = s,
		.dentry = dentry,
		.vfsmnt = vfsmnt,
		.mnt = container_of(vfsmnt, struct mount, mnt),
		.pos = ETWMON_PATH_MAX,
		.end = 0,
	};
	__u32 len;

	if (!dentry || !vfsmnt)
		return 0;
	bpf_loop(ETWMON_PATH_DEPTH, path_step, &w, 0);
	if (w.end != 1) {
		s->e.flags |= trunc_flag;
		return 0;
	}
	if (w.pos == ETWMON_PATH_MAX) { /* the root itself */
		w.pos -= 1;
		s->path[ETWMON_PATH_MAX - 1] = '/';
	}
	len = (ETWMON_PATH_MAX - w.pos) & (ETWMON_PATH_MAX - 1);
	bpf_probe_read_kernel(&s->tail[off & TAIL_MASK], len, &s->path[w.pos & (ETWMON_PATH_MAX - 1)]);
	return len;
}

/* exe and cwd of `task` after what is in the tail up to `off`; returns the new end of the tail. */
static __always_inline __u32 read_exe_cwd(struct scratch *s, __u32 off, struct task_struct *task)
{
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	__u32 n = 0;

	if (exe) {
		read_exe_identity(&s->e, exe);
		n = read_path(s, off, BPF_CORE_READ(exe, f_path.dentry), BPF_CORE_READ(exe, f_path.mnt),
			      ETWMON_EXE_TRUNCATED);
	}
	s->e.exe_len = n;
	off += n;
	n = read_path(s, off, BPF_CORE_READ(task, fs, pwd.dentry), BPF_CORE_READ(task, fs, pwd.mnt),
		      ETWMON_CWD_TRUNCATED);
	s->e.cwd_len = n;
	return off + n;
}

/* The task's cgroup path (etwmon_cgroup.h) after what is in the tail up to `off`; returns the new end. */
static __always_inline __u32 read_cgroup(struct scratch *s, __u32 off, struct task_struct *task)
{
	__u32 start = read_cgroup_path(task, s->path, &s->e.flags);
	__u32 len = (ETWMON_PATH_MAX - start) & (ETWMON_PATH_MAX - 1);

	s->e.cgroup_len = len;
	bpf_probe_read_kernel(&s->tail[off & TAIL_MASK], len, &s->path[start & (ETWMON_PATH_MAX - 1)]);
	return off + len;
}

static __always_inline void read_tty(struct etwmon_event *e, struct task_struct *task)
{
	struct tty_struct *tty = BPF_CORE_READ(task, signal, tty);

	e->tty[0] = 0;
	if (!tty) {
		e->flags |= ETWMON_NO_TTY;
		return;
	}
	bpf_probe_read_kernel_str(e->tty, sizeof(e->tty), &tty->name);
}

/* --- wire records written here (etwmon_event.h): thread records and process exits ------------------------- */

static __always_inline struct etwmon_config *wire_config(void)
{
	__u32 zero = 0;
	struct etwmon_config *c = bpf_map_lookup_elem(&config, &zero);

	return c && (c->flags & ETWMON_CONFIG_WIRE) ? c : 0;
}

static __always_inline __u64 filetime(struct etwmon_config *c, __u64 ns)
{
	return (ns + c->filetime_base) / 100;
}

/* The status as a shell reports it: exit(3) -> 3, killed by signal n -> 128 + n (etwmon's netlink too). */
static __always_inline __u32 shell_code(__u32 status)
{
	__u32 signo = status & 0x7F;

	return signo ? 128 + signo : (status >> 8) & 0xFF;
}

static __always_inline void put16(__u8 *at, __u16 v)
{
	at[0] = v;
	at[1] = v >> 8;
}

static __always_inline void put32(__u8 *at, __u32 v)
{
	put16(at, v);
	put16(at + 2, v >> 16);
}

static __always_inline void put64(__u8 *at, __u64 v)
{
	put32(at, v);
	put32(at + 4, v >> 32);
}

/* ItemHeader: Type, Size, padding, Time. */
static __always_inline void put_header(__u8 *w, __u16 type, __u16 size, __u64 time)
{
	put16(w, type);
	put16(w + 2, size);
	put32(w + 4, 0);
	put64(w + 8, time);
}

/* Tag, Length, then the ProcessGuid: the host and boot tags, the pid and the low 32 bits of the start FILETIME,
 * both big-endian (etwmon.identity.make_guid). */
static __always_inline void put_guid(__u8 *w, struct etwmon_config *c, __u32 pid, __u64 start)
{
	put16(w, 1);
	put16(w + 2, 16);
	__builtin_memcpy(w + 4, c->guid_prefix, 8);
	put32(w + 12, __builtin_bswap32(pid));
	put32(w + 16, __builtin_bswap32((__u32)start));
}

static __always_inline void put_block_header(__u8 *w, __u16 length)
{
	put16(w, 1); /* EXTENSION_VERSION */
	put16(w + 2, length);
	put32(w + 4, 0);
}

static __always_inline void output(__u8 *w, __u32 size)
{
	if (bpf_ringbuf_output(&events, w, size & WIRE_MASK, OUTPUT_FLAGS))
		count_lost();
}

/* ThreadCreate (exit = 0) or ThreadExit of thread `tid` of process `pid`, whose leader started at `start`. */
static __always_inline void wire_thread(struct scratch *s, struct etwmon_config *c, bool exit, __u64 time,
					__u32 tid, __u32 pid, __u32 code, __u64 start)
{
	__u8 *w = s->wire;
	__u32 base = exit ? 32 : 24;
	__u32 size = base;

	put32(w + 16, tid);
	put32(w + 20, pid);
	if (exit) {
		put32(w + 24, code);
		put32(w + 28, 0);
	}
	if (c->flags & ETWMON_CONFIG_IDENTITY) {
		put_block_header(w + base, 28);
		put_guid(w + base + 8, c, pid, start);
		size += 28;
	}
	put_header(w, exit ? 4 : 3, size, time);
	output(w, size);
}

struct widen {
	struct scratch *s;
	__u32 len;
	__u32 non_ascii;
};

/* One byte of the path in the tail to its UTF-16 code unit in the wire record, from offset 80 on. */
static long widen_step(__u32 i, void *arg)
{
	struct widen *x = arg;
	struct scratch *s = x->s;
	__u8 c;

	if (i >= x->len)
		return 1;
	c = s->tail[i & (ETWMON_PATH_MAX - 1)];
	if (c & 0x80) {
		x->non_ascii = 1; /* UTF-8 (or not): user space writes this one */
		return 1;
	}
	s->wire[(80 + 2 * i) & WIRE_MASK] = c;
	s->wire[(81 + 2 * i) & WIRE_MASK] = 0;
	return 0;
}

/* ProcessExit of `task`'s process, written here; false when user space must write it (a non-ASCII image). */
static __always_inline bool wire_process_exit(struct scratch *s, struct etwmon_config *c, struct task_struct *task,
					      __u64 time, __u32 pid, __u32 code, __u64 start)
{
	__u8 *w = s->wire;
	__u32 size = 24;

	put32(w + 16, pid);
	put32(w + 20, code);
	if (c->flags & ETWMON_CONFIG_IDENTITY) {
		struct file *exe = BPF_CORE_READ(task, mm, exe_file);
		struct widen x = {.s = s, .len = 0, .non_ascii = 0};

		put_guid(w + 32, c, pid, start);
		put16(w + 52, 14); /* StartTime */
		put16(w + 54, 8);
		put64(w + 56, start);
		put16(w + 64, 15); /* Lifetime, microseconds */
		put16(w + 66, 8);
		put64(w + 68, time > start ? (time - start) / 10 : 0);
		size = 76;
		s->e.flags = 0;
		if (exe)
			x.len = read_path(s, 0, BPF_CORE_READ(exe, f_path.dentry), BPF_CORE_READ(exe, f_path.mnt),
					  ETWMON_EXE_TRUNCATED);
		if (x.len) { /* known and whole (a cut path stays unknown, as the identity stage leaves it) */
			bpf_loop(ETWMON_PATH_MAX, widen_step, &x, 0);
			if (x.non_ascii)
				return false;
			put16(w + 76, 3); /* Image */
			put16(w + 78, (2 * x.len) & 0xFFFF);
			size = 80 + 2 * (x.len & (ETWMON_PATH_MAX - 1));
		}
		put_block_header(w + 24, size - 24);
	}
	put_header(w, 2, size, time);
	output(w, size);
	return true;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(etwmon_fork, struct task_struct *parent, struct task_struct *child)
{
	struct scratch *s = scratch_buffer();
	__u32 off;

	if (!s)
		return 0;
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid)) {
		struct etwmon_config *c = wire_config();

		if (c) {
			wire_thread(s, c, false, filetime(c, bpf_ktime_get_boot_ns()), BPF_CORE_READ(child, pid),
				    BPF_CORE_READ(child, tgid), 0,
				    filetime(c, BPF_CORE_READ(child, group_leader, start_boottime)));
			return 0;
		}
		fill(&s->e, ETWMON_FORK_THREAD, child);
		s->e.creating_pid = BPF_CORE_READ(parent, tgid);
		s->e.creating_tid = BPF_CORE_READ(parent, pid);
		emit(s, 0);
		return 0;
	}
	fill(&s->e, ETWMON_FORK_PROCESS, child);
	s->e.creating_pid = BPF_CORE_READ(parent, tgid);
	s->e.creating_tid = BPF_CORE_READ(parent, pid);
	read_tty(&s->e, child);
	off = read_argv(s, parent); /* the forking task is current: its argv is what the child inherits */
	off = read_exe_cwd(s, off, child);
	off = read_cgroup(s, off, child);
	emit(s, off);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(etwmon_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	struct scratch *s = scratch_buffer();
	__u32 off;
	long n;

	if (!s)
		return 0;
	fill(&s->e, ETWMON_EXEC, task);
	s->e.creating_pid = s->e.pid;
	s->e.creating_tid = old_pid; /* the thread that called exec, as it was numbered before */
	read_tty(&s->e, task);
	off = read_argv(s, task); /* the new mm: the arguments the new program got */
	n = bpf_probe_read_kernel_str(&s->tail[off & TAIL_MASK], ETWMON_PATH_MAX, BPF_CORE_READ(bprm, filename));
	if (n > 0) {
		n -= 1; /* without its NUL */
		if (n == ETWMON_PATH_MAX - 1)
			s->e.flags |= ETWMON_FILENAME_TRUNCATED;
		s->e.filename_len = n & (ETWMON_PATH_MAX - 1);
		off += s->e.filename_len;
	}
	off = read_exe_cwd(s, off, task);
	off = read_cgroup(s, off, task);
	emit(s, off);
	return 0;
}

static __always_inline struct task_struct *exec_task(struct signal_struct *sig)
{
	if (bpf_core_field_exists(sig->group_exec_task))
		return BPF_CORE_READ(sig, group_exec_task);
	return BPF_CORE_READ((struct signal_struct___old *)sig, group_exit_task);
}

/* One task's end; `last` is true when it is the last thread of its process (group_dead). */
static __always_inline int task_exit(struct task_struct *task, bool last)
{
	struct scratch *s = scratch_buffer();
	struct signal_struct *sig;
	struct task_struct *execing;
	struct etwmon_config *c;
	__u32 pid, tgid, code;

	if (!s)
		return 0;
	sig = BPF_CORE_READ(task, signal);
	pid = BPF_CORE_READ(task, pid);
	tgid = BPF_CORE_READ(task, tgid);
	execing = exec_task(sig);
	c = wire_config();
	if (c) {
		__u64 time = filetime(c, bpf_ktime_get_boot_ns());
		__u64 start = filetime(c, BPF_CORE_READ(task, group_leader, start_boottime));
		__u32 own = shell_code(BPF_CORE_READ(task, exit_code));

		if (pid == tgid && execing && execing != task) { /* de_thread: see below */
			wire_thread(s, c, true, time, BPF_CORE_READ(execing, pid), tgid, own, start);
			return 0;
		}
		if (!last) {
			wire_thread(s, c, true, time, pid, tgid, own, start);
			return 0;
		}
		code = BPF_CORE_READ(sig, flags) & SIGNAL_GROUP_EXIT ? BPF_CORE_READ(sig, group_exit_code)
								     : BPF_CORE_READ(task, group_leader, exit_code);
		if (pid != tgid) /* the last thread is not the leader: it ends too */
			wire_thread(s, c, true, time, pid, tgid, own, start);
		if (wire_process_exit(s, c, task, time, tgid, shell_code(code), start))
			return 0;
		/* the image is not ASCII: the event below, which user space writes (its thread exit is done) */
		fill(&s->e, ETWMON_EXIT_PROCESS, task);
		s->e.tid = tgid;
		s->e.start_boottime = BPF_CORE_READ(task, group_leader, start_boottime);
		s->e.exit_code = code;
		emit(s, 0);
		return 0;
	}
	if (pid == tgid && execing && execing != task) {
		/* A non-leader thread is exec'ing and the old leader dies for it (de_thread): the process lives
		 * on under its pid, and the exec'ing thread's old id is the one that goes away. */
		fill(&s->e, ETWMON_EXIT_THREAD, task);
		s->e.flags |= ETWMON_LEADER_REPLACED;
		s->e.tid = BPF_CORE_READ(execing, pid);
		s->e.exit_code = BPF_CORE_READ(task, exit_code);
		emit(s, 0);
		return 0;
	}
	if (last) {
		fill(&s->e, ETWMON_EXIT_PROCESS, task);
		/* the process started when its leader did (this thread may be another, started later) */
		s->e.start_boottime = BPF_CORE_READ(task, group_leader, start_boottime);
		/* what wait() reports for the process (wait_task_zombie) */
		if (BPF_CORE_READ(sig, flags) & SIGNAL_GROUP_EXIT)
			s->e.exit_code = BPF_CORE_READ(sig, group_exit_code);
		else
			s->e.exit_code = BPF_CORE_READ(task, group_leader, exit_code);
		s->e.creating_tid = BPF_CORE_READ(task, exit_code); /* this thread's own status */
		emit(s, 0);
		return 0;
	}
	fill(&s->e, ETWMON_EXIT_THREAD, task);
	s->e.exit_code = BPF_CORE_READ(task, exit_code);
	emit(s, 0);
	return 0;
}

/* Where the tracepoint passes group_dead (do_exit's atomic_dec_and_test of signal->live: true for exactly one
 * thread of a process). The loader picks this program or the next one from the kernel's BTF. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(etwmon_exit_group_dead, struct task_struct *task, bool group_dead)
{
	return task_exit(task, group_dead);
}

/* Older kernels: signal->live as read at the tracepoint. do_exit() decremented it earlier, so when threads
 * of an exit_group end at the same moment two of them may both read 0 (the reason to prefer group_dead). */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(etwmon_exit, struct task_struct *task)
{
	return task_exit(task, BPF_CORE_READ(task, signal, live.counter) == 0);
}
