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

/* A wire record the kernel writes itself (see etwmon_event.h) is built in `wire`: the fixed part, the command
 * line and paths widened to UTF-16 (two bytes per byte), the block. Offsets into it are masked with WIRE_MASK;
 * the slack after it takes the few bytes a field writes past a masked offset. */
#define WIRE_SIZE 65536
#define WIRE_MASK (WIRE_SIZE - 1)
#define WIRE_SLACK 64
/* The longest command line (UTF-16 code units) a record can hold: (65535 - sizeof(ProcessCreateInfo)) / 2. */
#define MAX_COMMAND_LINE 32747

struct scratch {
	struct etwmon_event e;
	char tail[TAIL_ROOM];
	char path[ETWMON_PATH_MAX + NAME_MAX + 1]; /* a path is built here backwards, then copied to the tail */
	__u8 wire[WIRE_SIZE + WIRE_SLACK];
	__u8 quote[ETWMON_ARGV_MAX + 1]; /* at the offset where each argument starts: 1 when it must be quoted */
	__u32 at; /* the write position in `wire` while a record is built (see AT) */
	__u32 image_at; /* where the record's Image field starts in `wire` (a fork's ParentImage copies it) */
	struct cursor {
		__u32 n, start, k, unsafe, quoted, fail, pts;
	} cur; /* the command line's passes and the tty's (see V) */
};

/* One scratch buffer per CPU (an event is too big for the BPF stack and for a per-CPU array's 32 KiB
 * value limit); the loader sets max_entries to the number of possible CPUs. Tracepoint programs run with
 * preemption off, so a CPU's buffer is used by one program at a time. */
ETWMON_MAP(scratch, BPF_MAP_TYPE_ARRAY, 1, __u32, struct scratch);

/* The events, in the order they were reserved. The loader sets the size (a power of two of pages). */
ETWMON_RINGBUF_MAP(events);

/* The loader's settings (struct etwmon_config), written once after load and before attach. */
ETWMON_MAP(config, BPF_MAP_TYPE_ARRAY, 1, __u32, struct etwmon_config);

/* Events that could not be written (ring full), per CPU: the reader sums them. */
ETWMON_MAP(lost, BPF_MAP_TYPE_PERCPU_ARRAY, 1, __u32, __u64);

/* Wake-ups. With the pacer (the default object; etwmon_nopace.bpf.o is built without it for kernels whose
 * verifier refuses a timer in these programs), every record goes in with BPF_RB_NO_WAKEUP and the first one the
 * reader has not been woken for arms `pacer`, a timer that wakes it config.wake_us later: one wake-up serves
 * every record of that window however fast they come, and a ring more than a quarter full wakes it at once.
 * Without the pacer, or with wake_us 0, the ring's adaptive rule: a wake-up whenever the reader has caught up. */
static __always_inline __u32 wake_us(void)
{
	__u32 zero = 0;
	struct etwmon_config *c = bpf_map_lookup_elem(&config, &zero);

	return c ? c->wake_us : 0;
}

#ifndef ETWMON_NO_PACER
struct pacer {
	struct bpf_timer timer;
	__u64 armed_at; /* bpf_ktime_get_ns() when the timer was armed (or last found late) */
	__u64 late;     /* wake-ups forced because the timer was late (the loader's stats: wake_late) */
	__u32 armed;    /* 1 from the record that armed the timer until it fires */
	__u32 pad;
};
ETWMON_MAP(pacer, BPF_MAP_TYPE_ARRAY, 1, __u32, struct pacer);

/* A record discarded with FORCE_WAKEUP wakes the readers and costs them nothing (readers skip discarded
 * records). Should the ring be full, the quarter-full rule has woken them already. */
static __always_inline void wake_readers(void)
{
	void *mark = bpf_ringbuf_reserve(&events, 8, 0);

	if (mark)
		bpf_ringbuf_discard(mark, BPF_RB_FORCE_WAKEUP);
}

static int pacer_fired(void *map, __u32 *key, struct pacer *p)
{
	p->armed = 0; /* first: a record written after this arms the timer again, so none waits unseen */
	wake_readers();
	return 0;
}

static __always_inline __u64 output_flags(__u32 us)
{
	if (!us)
		return BPF_RB_FORCE_WAKEUP; /* batch_wait 0: every record wakes the readers (never left unseen) */
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > bpf_ringbuf_query(&events, BPF_RB_RING_SIZE) / 4)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

/* After a record is in the ring: the reader is woken within wake_us of it. */
static __always_inline void paced(__u32 us)
{
	__u32 zero = 0;
	struct pacer *p;

	if (!us)
		return;
	p = bpf_map_lookup_elem(&pacer, &zero);
	if (!p)
		return;
	if (p->armed) {
		/* Armed already: its wake-up comes after this record. Unless it is late (the timer expires in softirq
		 * context, which a CPU-bound storm can keep waiting): then wake the readers now, once per 4 windows. */
		__u64 now = bpf_ktime_get_ns();

		if (now - p->armed_at > (__u64)us * 4000) {
			p->armed_at = now;
			__sync_fetch_and_add(&p->late, 1);
			wake_readers();
		}
		return;
	}
	if (__sync_lock_test_and_set(&p->armed, 1))
		return;
	p->armed_at = bpf_ktime_get_ns();
	bpf_timer_init(&p->timer, &pacer, CLOCK_MONOTONIC); /* -EBUSY after the first time: nothing to do */
	if (bpf_timer_set_callback(&p->timer, pacer_fired) || bpf_timer_start(&p->timer, (__u64)us * 1000, 0)) {
		p->armed = 0; /* no timer (cannot happen once loaded): wake them now rather than never */
		wake_readers();
	}
}
#else
static __always_inline __u64 output_flags(__u32 us)
{
	return 0;
}

static __always_inline void paced(__u32 us)
{
}
#endif

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&lost, &zero);

	if (n)
		*n += 1;
}

/* One record into the ring (counted as lost when there is no room), with the wake-up the pacer decides. */
static __always_inline void ring_output(void *data, __u64 size)
{
	__u32 us = wake_us();

	if (bpf_ringbuf_output(&events, data, size, output_flags(us)))
		count_lost();
	else
		paced(us);
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
	ring_output(&s->e, size);
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

#define ETWMON_WALK_MAX ETWMON_PATH_MAX
#define ETWMON_WALK_ROOM 0
#include "etwmon_path.h"

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
	barrier_var(size); /* keep the mask below: the verifier needs it even where the compiler sees no use */
	ring_output(w, size & WIRE_MASK);
}

static __always_inline void put_tlv(__u8 *at, __u16 tag, __u16 len)
{
	put16(at, tag);
	put16(at + 2, len);
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

/* A path in the tail widened to UTF-16 in the wire record: `len` bytes from tail offset `from` to wire
 * offset `to`, one bpf_loop step per byte; `fail` set at a byte >= 0x80 (UTF-8, or not: user space writes it). */
struct copy16 {
	struct scratch *s;
	__u32 from; /* tail offset */
	__u32 to;   /* wire offset */
	__u32 len;
	__u32 fail;
};

static long copy16_step(__u32 i, void *arg)
{
	struct copy16 *x = arg;
	struct scratch *s = x->s;
	__u8 c;

	if (i >= x->len)
		return 1;
	c = s->tail[(x->from + i) & TAIL_MASK];
	if (c & 0x80) {
		x->fail = 1;
		return 1;
	}
	s->wire[(x->to + 2 * i) & WIRE_MASK] = c;
	s->wire[(x->to + 2 * i + 1) & WIRE_MASK] = 0;
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
		struct copy16 x = {.s = s, .from = 0, .to = 80, .len = 0, .fail = 0};

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
			bpf_loop(ETWMON_PATH_MAX, copy16_step, &x, 0);
			if (x.fail)
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

/* --- ProcessCreate and ProcessExec written here ------------------------------------------------------------
 * The command line is what etwmon.records.command_line_from_argv makes of argv (shlex.join): arguments split
 * at NULs (one trailing NUL dropped), joined by spaces, an argument of only safe characters ([A-Za-z0-9_@%+=:,./-])
 * as it is, any other quoted in '...' with each ' written '"'"', an empty one ''. Two passes over argv, one
 * bpf_loop step per byte: which arguments need quotes, then the UTF-16LE text. Any byte >= 0x80 anywhere (argv,
 * paths, tty), argv cut or unreadable, or a record that would not fit in 64 KiB: the event goes out as an
 * etwmon_event instead, for user space to write exactly as before (it counts them). */

/* The state of the two passes, kept in the scratch buffer (struct cursor): a counter on the stack would make the
 * verifier follow each of its values through the loop as a state of its own. V() reads and writes it. */
#define V(x) (*(volatile __u32 *)&(x))

struct loop_arg {
	struct scratch *s;
};

static __always_inline bool safe_char(__u8 c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '@' ||
	       c == '%' || c == '+' || c == '=' || c == ':' || c == ',' || c == '.' || c == '/' || c == '-';
}

static long classify_step(__u32 i, void *arg)
{
	struct scratch *s = ((struct loop_arg *)arg)->s;
	struct cursor *x = &s->cur;
	__u32 n = V(x->n), start;
	__u8 c;

	if (i > n)
		return 1;
	c = i == n ? 0 : s->tail[i & TAIL_MASK];
	if (c & 0x80) {
		V(x->fail) = 1;
		return 1;
	}
	if (c == 0) {
		start = V(x->start);
		s->quote[start & (ETWMON_ARGV_MAX - 1)] = V(x->unsafe) || i == start;
		V(x->start) = i + 1;
		V(x->unsafe) = 0;
	} else if (!safe_char(c)) {
		V(x->unsafe) = 1;
	}
	return 0;
}

static __always_inline void put_char(struct scratch *s, __u8 c)
{
	__u32 k = V(s->cur.k), at = 34 + 2 * k;

	s->wire[at & WIRE_MASK] = c;
	s->wire[(at + 1) & WIRE_MASK] = 0;
	V(s->cur.k) = k + 1;
}

static long text_step(__u32 i, void *arg)
{
	struct scratch *s = ((struct loop_arg *)arg)->s;
	struct cursor *x = &s->cur;
	__u32 n = V(x->n), quoted;
	__u8 c;

	if (i > n)
		return 1;
	if (V(x->k) > MAX_COMMAND_LINE - 8) {
		V(x->fail) = 1; /* the record would be cut: user space cuts it exactly as before */
		return 1;
	}
	if (i == V(x->start)) {
		if (i)
			put_char(s, ' ');
		V(x->quoted) = s->quote[i & (ETWMON_ARGV_MAX - 1)];
		if (V(x->quoted))
			put_char(s, '\'');
	}
	quoted = V(x->quoted);
	c = i == n ? 0 : s->tail[i & TAIL_MASK];
	if (c == 0) {
		if (quoted)
			put_char(s, '\'');
		V(x->start) = i + 1;
	} else if (c == '\'' && quoted) {
		put_char(s, '\'');
		put_char(s, '"');
		put_char(s, '\'');
		put_char(s, '"');
		put_char(s, '\'');
	} else {
		put_char(s, c);
	}
	return 0;
}

/* The command line from the argv in the tail, UTF-16LE at offset 34 of the wire record; its length in code units,
 * or -1 when user space must write it. */
static __always_inline long wire_command_line(struct scratch *s)
{
	struct loop_arg arg = {.s = s};
	struct cursor *x = &s->cur;
	__u32 len = s->e.argv_len;

	if (s->e.flags & (ETWMON_ARGV_TRUNCATED | ETWMON_ARGV_FAULT | ETWMON_NO_MM))
		return -1;
	if (!len)
		return 0;
	V(x->n) = s->tail[(len - 1) & TAIL_MASK] ? len : len - 1;
	V(x->start) = 0;
	V(x->unsafe) = 0;
	V(x->fail) = 0;
	V(x->k) = 0;
	bpf_loop(ETWMON_ARGV_MAX + 1, classify_step, &arg, 0);
	if (V(x->fail))
		return -1;
	V(x->start) = 0;
	bpf_loop(ETWMON_ARGV_MAX + 1, text_step, &arg, 0);
	if (V(x->fail))
		return -1;
	return V(x->k) & 0xFFFF;
}

/* The tty name: its length, ASCII, and whether it is "pts" and digits (pass 1). */
static long tty_check_step(__u32 j, void *arg)
{
	struct scratch *s = ((struct loop_arg *)arg)->s;
	__u8 ch = s->e.tty[j & 31];

	if (j >= sizeof(s->e.tty) - 1 || !ch)
		return 1;
	if (ch & 0x80) {
		V(s->cur.fail) = 1;
		return 1;
	}
	if (j < 3 ? ch != "pts"[j] : ch < '0' || ch > '9')
		V(s->cur.pts) = 0;
	V(s->cur.n) = j + 1;
	return 0;
}

/* ... widened, with '/' after "pts" (pass 2), at s->at. */
static long tty_step(__u32 j, void *arg)
{
	struct scratch *s = ((struct loop_arg *)arg)->s;
	__u32 at;

	if (j >= V(s->cur.n))
		return 1;
	if (V(s->cur.pts) && j == 3) {
		at = V(s->at);
		put16(&s->wire[at & WIRE_MASK], '/');
		V(s->at) = at + 2;
	}
	at = V(s->at);
	put16(&s->wire[at & WIRE_MASK], s->e.tty[j & 31]);
	V(s->at) = at + 2;
	return 0;
}

/* A text field (tag, UTF-16LE of `len` ASCII bytes of the tail at `from`) at wire offset `at`; the offset after
 * it, or 0 when it is not ASCII or would not fit. */
static __always_inline __u32 put_text(struct scratch *s, __u32 at, __u16 tag, __u32 from, __u32 len)
{
	struct copy16 x = {.s = s, .from = from, .to = at + 4, .len = len};

	if (at + 4 + 2 * len > 0xFFFF)
		return 0;
	put_tlv(&s->wire[at & WIRE_MASK], tag, 2 * len);
	bpf_loop(ETWMON_PATH_MAX, copy16_step, &x, 0);
	return x.fail ? 0 : at + 4 + 2 * len;
}

/* Where the next field of the record being built goes: kept in the scratch buffer (read and written through
 * volatile accesses) rather than in a register, so that the fields that may be present or not do not make the
 * verifier follow every combination of them as a distinct state. */
#define AT(s) (*(volatile __u32 *)&(s)->at)

/* A fixed-size field: Tag, Length, then `len` bytes of `v` (little-endian). */
static __always_inline void put_fixed(struct scratch *s, __u16 tag, __u16 len, __u64 v)
{
	__u32 at = AT(s);

	put_tlv(&s->wire[at & WIRE_MASK], tag, len);
	if (len == 8)
		put64(&s->wire[(at + 4) & WIRE_MASK], v);
	else
		put32(&s->wire[(at + 4) & WIRE_MASK], v);
	AT(s) = at + 4 + len;
}

/* A text field from the tail (see put_text), at AT(s); false when user space must write the record. */
static __always_inline bool put_tail_text(struct scratch *s, __u16 tag, __u32 from, __u32 len)
{
	__u32 at = put_text(s, AT(s), tag, from, len);

	AT(s) = at;
	return at != 0;
}

/* ParentImage (7): the real parent's executable path, at AT(s); false when user space must write the record (the
 * path is not ASCII or would not fit). A cut or unknown path leaves the field out (unknown), as Image. A fork's
 * child runs the program of the process that forked it: when that is its parent (no CLONE_PARENT), the record's
 * Image field is the path already, copied; otherwise (an exec, or a fork for another parent) the parent's
 * mm->exe_file is walked after the tail's end (`from`). */
static __always_inline bool put_parent_image(struct scratch *s, __u16 type, struct task_struct *task, __u32 from)
{
	struct etwmon_event *e = &s->e;
	struct file *exe;
	__u32 at, len, image;

	if (type == 1 && e->ppid == e->creating_pid) {
		if (!e->exe_len)
			return true;
		at = AT(s);
		image = V(s->image_at);
		len = (2 * e->exe_len) & (2 * ETWMON_PATH_MAX - 1);
		if (at + 4 + len > 0xFFFF)
			return false;
		put_tlv(&s->wire[at & WIRE_MASK], 7, len);
		bpf_probe_read_kernel(&s->wire[(at + 4) & WIRE_MASK], len, &s->wire[(image + 4) & WIRE_MASK]);
		AT(s) = at + 4 + len;
		return true;
	}
	exe = BPF_CORE_READ(task, real_parent, mm, exe_file);
	if (!exe)
		return true; /* a kernel thread's child, or a parent past exit_mm: unknown */
	len = read_path(s, from, BPF_CORE_READ(exe, f_path.dentry), BPF_CORE_READ(exe, f_path.mnt), 0);
	if (!len)
		return true;
	return put_tail_text(s, 7, from, len);
}

/* ProcessCreate (type 1) or ProcessExec (101) from the event and tail in `s`; false when user space must write
 * it (the event is emitted instead). The block's fields are those the identity stage writes for the kernel's
 * facts, in its order (etwmon.records.TAG_ORDER): see docs/identity.md for those left to user space. */
static __always_inline bool wire_create(struct scratch *s, struct etwmon_config *c, __u16 type,
					struct task_struct *task, __u32 filename_len)
{
	struct etwmon_event *e = &s->e;
	__u8 *w = s->wire;
	long chars = wire_command_line(s);
	__u32 at, block, from, i;
	__u16 flags = 0;

	if (chars < 0)
		return false;
	put32(w + 16, e->pid);
	put32(w + 20, e->ppid);
	put32(w + 24, e->creating_tid);
	put32(w + 28, e->creating_pid);
	put16(w + 32, chars);
	at = 34 + 2 * (chars & 0xFFFF);
	for (i = 0; i < 6; i++) /* the NUL and the struct's tail padding */
		w[(at + i) & WIRE_MASK] = 0;
	at += 6;
	AT(s) = at;
	if (c->flags & ETWMON_CONFIG_IDENTITY) {
		struct task_struct *parent = BPF_CORE_READ(task, real_parent);
		__u64 pstart = filetime(c, BPF_CORE_READ(parent, group_leader, start_boottime));
		__u64 start = filetime(c, e->start_boottime);

		block = at;
		at += 8;
		put_guid(&w[at & WIRE_MASK], c, e->pid, start);
		put_guid(&w[(at + 20) & WIRE_MASK], c, e->ppid, pstart);
		put16(&w[(at + 20) & WIRE_MASK], 2); /* ParentProcessGuid */
		AT(s) = at + 40;
		put_fixed(s, 5, 4, e->euid); /* Uid: the effective one */
		put_fixed(s, 14, 8, start); /* StartTime */
		if (e->exe_flags) {
			__u32 major = e->exe_dev >> 20, minor = e->exe_dev & 0xFFFFF;

			/* ExeDevice as stat's st_dev, ExeInode, ExeFlags (records.ExeFlags is the kernel's >> 1) */
			put_fixed(s, 17, 4, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12));
			put_fixed(s, 18, 8, e->exe_ino);
			put_fixed(s, 19, 4, (e->exe_flags >> 1) & 0xF);
		}
		if (e->mnt_ns)
			put_fixed(s, 20, 4, e->mnt_ns);
		if (e->pid_ns) {
			put_fixed(s, 21, 4, e->pid_ns);
			put_fixed(s, 22, 4, e->ns_pid);
		}
		if (e->cgroup_id)
			put_fixed(s, 23, 8, e->cgroup_id);
		from = e->argv_len + filename_len;
		V(s->image_at) = AT(s);
		if (e->exe_len && !put_tail_text(s, 3, from, e->exe_len)) /* Image */
			return false;
		from += e->exe_len;
		if (e->cwd_len && !put_tail_text(s, 4, from, e->cwd_len)) /* CurrentDirectory */
			return false;
		from += e->cwd_len;
		if (e->tty[0]) { /* Tty as ps writes it: "pts3" is "pts/3" */
			struct loop_arg arg = {.s = s};
			__u32 field = AT(s);

			V(s->cur.fail) = 0;
			V(s->cur.pts) = 1;
			V(s->cur.n) = 0;
			bpf_loop(sizeof(e->tty), tty_check_step, &arg, 0);
			if (V(s->cur.fail))
				return false;
			if (V(s->cur.n) <= 3)
				V(s->cur.pts) = 0;
			AT(s) = field + 4;
			bpf_loop(sizeof(e->tty), tty_step, &arg, 0);
			at = AT(s);
			put_tlv(&w[field & WIRE_MASK], 10, (at - field - 4) & 0xFFFF);
		}
		if (e->cgroup_len) {
			if (!put_tail_text(s, 12, from, e->cgroup_len)) /* Cgroup */
				return false;
		} else if (e->flags & ETWMON_CGROUP_TRUNCATED) {
			flags |= 1; /* EventFlags.TRUNCATED, as the identity stage sets it */
		}
		if (!put_parent_image(s, type, task, from + e->cgroup_len))
			return false;
		at = AT(s);
		if (at > 0xFFFF)
			return false;
		put_block_header(&w[block & WIRE_MASK], at - block);
		put16(&w[(block + 4) & WIRE_MASK], flags);
	}
	at = AT(s);
	if (at > 0xFFFF)
		return false;
	put_header(w, type, at, filetime(c, e->time_ns));
	output(w, at);
	return true;
}

static __always_inline struct etwmon_config *create_config(void)
{
	struct etwmon_config *c = wire_config();

	return c && (c->flags & ETWMON_CONFIG_CREATES) ? c : 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(etwmon_fork, struct task_struct *parent, struct task_struct *child)
{
	struct scratch *s = scratch_buffer();
	struct etwmon_config *c;
	__u32 off;

	if (!s)
		return 0;
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid)) {
		c = wire_config();

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
	c = create_config();
	if (c && wire_create(s, c, 1, child, 0))
		return 0;
	emit(s, off);
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(etwmon_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	struct scratch *s = scratch_buffer();
	struct etwmon_config *c;
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
	c = create_config();
	if (c && wire_create(s, c, 101, task, s->e.filename_len))
		return 0;
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
