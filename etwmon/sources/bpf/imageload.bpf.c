// SPDX-License-Identifier: GPL-2.0
/* etwmon's image loads: one record per file mapped executable into a process (a shared library ld.so maps, a
 * dlopen, an LD_PRELOAD), written by the kernel side as the finished wire record, the book's ImageLoadInfo and
 * the extension block (imageload.h), into a ring buffer of its own. Loaded by etwmon/sources/bpf/imageload.py only
 * when image loads are asked for; rebuilt with build.sh.
 *
 * Where: the syscall tracepoints syscalls/sys_enter_mmap and sys_exit_mmap (not a hook on every syscall). The
 * entry remembers (fd, prot, length, offset) per thread; the exit, when mmap succeeded, resolves the descriptor
 * to its struct file. ld.so maps an image in two steps: the whole span at file offset 0 (read-only), then each
 * segment over it with MAP_FIXED, the code with PROT_EXEC. So the offset-0 mapping of a file is remembered per
 * thread, and when the same file is mapped executable inside that span the record reports the span: LoadAddress
 * its start (dladdr's dli_fbase, the image's base), ImageSize its length; one record per image per load.
 * An executable mapping of a file without such a span (a program's own mmap) reports LoadAddress = address -
 * file offset and ImageSize = the mapping's length.
 *
 * What the kernel maps itself at exec (the program and its interpreter, binfmt_elf's vm_mmap, no syscall) is
 * reported from tp_btf/sched_process_exec instead: the auxiliary vector the kernel saved for the new program
 * names where (AT_PHDR in the program's first mapping, AT_BASE the interpreter's base), bpf_find_vma the file
 * mapped there; ImageSize is then the span of that file's consecutive mappings (page-rounded).
 *
 * Nothing here changes kernel state; every record that cannot be written is counted per CPU in
 * `imageload_lost`, by cause.
 */
#include "etwmon_kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "imageload.h"

char LICENSE[] SEC("license") = "GPL";

const volatile struct imageload_config imageload_config = {};

#define PROT_EXEC 0x4
#define MAP_ANONYMOUS 0x20
#define MAX_ERRNO 4095
#define NAME_MAX 255
#define FILETIME_UNIX_EPOCH 116444736000000000ULL
#define REC_MASK 0x7FFF
#define PATH_MASK (IMAGELOAD_PATH_MAX - 1)
#define WIDE_MASK 0x1FFF
/* The walk stops this far from the start of the buffer, so a cut path can take the marker in front. */
#define MARKER_ROOM 16
/* TRUNCATION_MARKER ("\u2026[truncated]") is 14 bytes in UTF-8, written as stores (a string constant would
 * land in .rodata beside the configuration the loader writes there). */
#define MARKER_UTF8_LEN 14

#define AUXV_WORDS 64 /* of mm->saved_auxv read (AT_VECTOR_SIZE is 52 on x86-64) */

struct scratch {
	struct imageload_prefix prefix;
	__u8 rec[REC_MASK + 1 + 8];   /* the record; every write is masked with REC_MASK */
	char path[WIDE_MASK + 1];     /* a path is built here backwards, ending at IMAGELOAD_PATH_MAX */
	__u64 auxv[AUXV_WORDS];
};

/* One scratch buffer per CPU (too big for the stack and for a per-CPU array value); the loader sets
 * max_entries to the number of possible CPUs. */
ETWMON_MAP(imageload_scratch, BPF_MAP_TYPE_ARRAY, 1, __u32, struct scratch);

ETWMON_RINGBUF_MAP(imageload_events);

ETWMON_MAP(imageload_lost, BPF_MAP_TYPE_PERCPU_ARRAY, IMAGELOAD_LOST_SLOTS, __u32, __u64);

/* An mmap between its entry and its exit, per thread (pid_tgid). Entries are removed at the exit. */
struct pending {
	__u64 len;
	__u64 off;
	__u32 fd;
	__u32 prot;
};

ETWMON_MAP(imageload_pending, 1 /* BPF_MAP_TYPE_HASH */, 16384, __u64, struct pending);

/* The last offset-0 mapping of a file per thread: the span ld.so reserves for an image. Least recently used
 * ones make room (then the fallback base, address - offset, is reported). */
struct span {
	__u64 file;
	__u64 addr;
	__u64 len;
	__u32 reported;
	__u32 reserved;
};

ETWMON_MAP(imageload_spans, 9 /* BPF_MAP_TYPE_LRU_HASH */, 16384, __u64, struct span);

/* The syscall tracepoints' records (events/syscalls/sys_{enter,exit}_mmap/format). */
struct syscall_enter {
	__u64 common;
	__s64 nr;
	unsigned long args[6];
};

struct syscall_exit {
	__u64 common;
	__s64 nr;
	long ret;
};

static __always_inline void count_lost(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&imageload_lost, &slot);

	if (n)
		*n += 1;
}

SEC("tracepoint/syscalls/sys_enter_mmap")
int imageload_mmap_enter(struct syscall_enter *ctx)
{
	unsigned long prot = ctx->args[2], flags = ctx->args[3], fd = ctx->args[4], off = ctx->args[5];
	__u64 id = bpf_get_current_pid_tgid();
	struct pending p = {};

	if ((flags & MAP_ANONYMOUS) || (int)fd < 0)
		return 0; /* anonymous memory is not an image */
	if (!(prot & PROT_EXEC) && off != 0)
		return 0; /* neither code nor the start of an image's span */
	p.len = ctx->args[1];
	p.off = off;
	p.fd = fd;
	p.prot = prot;
	if (bpf_map_update_elem(&imageload_pending, &id, &p, 0 /* BPF_ANY */) && (prot & PROT_EXEC))
		count_lost(IMAGELOAD_LOST_PENDING);
	return 0;
}

static __always_inline struct file *fd_file(struct task_struct *task, __u32 fd)
{
	struct fdtable *fdt = BPF_CORE_READ((struct task_struct___il *)task, files, fdt);
	struct file **fds;
	struct file *file = NULL;

	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return file;
}

static __always_inline __u64 filetime(__u64 boot_ns)
{
	return (__u64)((__s64)boot_ns + imageload_config.offset_ns) / 100 + FILETIME_UNIX_EPOCH;
}

/* --- the path walk (etwmon_path.h, into this program's scratch) ------------------------------------ */

#define ETWMON_WALK_MAX IMAGELOAD_PATH_MAX
#define ETWMON_WALK_ROOM MARKER_ROOM
#include "etwmon_path.h"

/* The path of `f` in s->path[*start .. IMAGELOAD_PATH_MAX); returns its length. A path deeper than
 * IMAGELOAD_PATH_DEPTH components or longer than the buffer keeps its end, with TRUNCATION_MARKER (UTF-8) in
 * front, and *cut is set. */
static __always_inline __u32 file_path(struct scratch *s, struct file *f, __u32 *start, bool *cut)
{
	struct vfsmount *vfsmnt = BPF_CORE_READ(f, f_path.mnt);
	struct walk w = {
		.s = s,
		.dentry = BPF_CORE_READ(f, f_path.dentry),
		.vfsmnt = vfsmnt,
		.mnt = container_of(vfsmnt, struct mount, mnt),
		.pos = IMAGELOAD_PATH_MAX,
		.end = 0,
	};

	*cut = false;
	bpf_loop(IMAGELOAD_PATH_DEPTH, path_step, &w, 0);
	if (w.end != 1) {
		__u32 pos = (w.pos - MARKER_UTF8_LEN) & PATH_MASK;

		char *p = &s->path[pos];

		p[0] = 0xe2; p[1] = 0x80; p[2] = 0xa6; p[3] = '['; p[4] = 't'; p[5] = 'r'; p[6] = 'u';
		p[7] = 'n'; p[8] = 'c'; p[9] = 'a'; p[10] = 't'; p[11] = 'e'; p[12] = 'd'; p[13] = ']';
		w.pos = pos;
		*cut = true;
	} else if (w.pos == IMAGELOAD_PATH_MAX) {
		w.pos -= 1;
		s->path[IMAGELOAD_PATH_MAX - 1] = '/';
	}
	*start = w.pos;
	return (IMAGELOAD_PATH_MAX - w.pos) & (IMAGELOAD_PATH_MAX - 1 + IMAGELOAD_PATH_MAX);
}

/* --- text: bytes to UTF-16LE units, in place in the record ------------------------------------------ */

struct widen {
	struct scratch *s;
	__u32 src; /* in s->path */
	__u32 dst; /* in s->rec */
	__u32 non_ascii;
};

static long widen_step(__u32 i, void *arg)
{
	struct widen *w = arg;
	struct scratch *s = w->s;
	__u8 b = s->path[(w->src + i) & WIDE_MASK];
	__u32 at = (w->dst + 2 * i) & REC_MASK;

	s->rec[at] = b;
	if (b < 0x80) {
		s->rec[at + 1] = 0;
	} else {
		s->rec[at + 1] = 0xDC; /* U+DC80..U+DCFF: the byte as a surrogate escape */
		w->non_ascii = 1;
	}
	return 0;
}

/* Bytes s->path[src, src + n) as n UTF-16 units at s->rec[dst]; returns 1 when one was not ASCII. */
static __always_inline __u32 widen(struct scratch *s, __u32 src, __u32 n, __u32 dst)
{
	struct widen w = {.s = s, .src = src, .dst = dst, .non_ascii = 0};

	bpf_loop(n, widen_step, &w, 0);
	return w.non_ascii;
}

static __always_inline void put16(struct scratch *s, __u32 at, __u16 v)
{
	at &= REC_MASK;
	s->rec[at] = v;
	s->rec[at + 1] = v >> 8;
}

/* --- the record ------------------------------------------------------------------------------------ */

static __always_inline void emit(struct scratch *s, struct task_struct *task, struct file *file, __u64 base,
				 __u64 size)
{
	struct task_struct *leader = BPF_CORE_READ(task, group_leader);
	struct inode *inode = BPF_CORE_READ((struct file___il *)file, f_inode);
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);
	__u32 pid = BPF_CORE_READ(task, tgid);
	__u64 start = filetime(BPF_CORE_READ(leader, start_boottime));
	__u32 kdev = BPF_CORE_READ(inode, i_sb, s_dev);
	__u32 major = kdev >> 20, minor = kdev & 0xFFFFF;
	__u32 flags = 0, non_ascii = 0, cuts = 0, pos, len, keep, off;
	bool cut;

	__builtin_memset(s->rec, 0, IMAGELOAD_BASE_SIZE);
	*(__s16 *)&s->rec[0] = IMAGELOAD_TYPE;
	*(__u64 *)&s->rec[8] = filetime(bpf_ktime_get_boot_ns());
	*(__u32 *)&s->rec[16] = pid;
	*(__u32 *)&s->rec[20] = size > 0xFFFFFFFF ? 0xFFFFFFFF : size;
	*(__u64 *)&s->rec[24] = base;

	/* ImageFileName: up to 300 characters, NUL-terminated; a longer path keeps 288 and TRUNCATION_MARKER */
	len = file_path(s, file, &pos, &cut);
	if (cut) {
		flags |= IMAGELOAD_EVENT_TRUNCATED;
		cuts |= IMAGELOAD_PATH_CUT;
	}
	keep = len > IMAGELOAD_NAME_CHARS ? IMAGELOAD_NAME_KEEP : len;
	non_ascii |= widen(s, pos, keep, IMAGELOAD_NAME_OFFSET);
	if (len > IMAGELOAD_NAME_CHARS) {
		__u32 m = IMAGELOAD_NAME_OFFSET + 2 * IMAGELOAD_NAME_KEEP;

		flags |= IMAGELOAD_EVENT_TRUNCATED;
		put16(s, m, 0x2026);
		/* "[truncated]" as UTF-16LE, four units a store */
		*(__u64 *)&s->rec[m + 2] = 0x007500720074005BULL;
		*(__u64 *)&s->rec[m + 10] = 0x007400610063006EULL;
		*(__u64 *)&s->rec[m + 18] = 0x0000005D00640065ULL;
	}

	/* The extension block: version, length and flags are written last. */
	off = IMAGELOAD_BASE_SIZE + 8;
	*(__u16 *)&s->rec[off] = TAG_PROCESS_GUID;
	*(__u16 *)&s->rec[off + 2] = 16;
	*(__u64 *)&s->rec[off + 4] = *(const volatile __u64 *)imageload_config.guid_prefix; /* volatile: set at load */
	*(__u32 *)&s->rec[off + 12] = __builtin_bswap32(pid);
	*(__u32 *)&s->rec[off + 16] = __builtin_bswap32((__u32)start);
	off += 20;
	*(__u16 *)&s->rec[off] = TAG_EXE_DEVICE; /* new_encode_dev: 12-bit major, 20-bit minor fit 32 bits */
	*(__u16 *)&s->rec[off + 2] = 4;
	*(__u32 *)&s->rec[off + 4] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12);
	off += 8;
	*(__u16 *)&s->rec[off] = TAG_EXE_INODE;
	*(__u16 *)&s->rec[off + 2] = 8;
	*(__u64 *)&s->rec[off + 4] = BPF_CORE_READ(inode, i_ino);
	off += 12;
	if (len > IMAGELOAD_NAME_CHARS) { /* the whole path, which the name had to cut */
		put16(s, off, TAG_IMAGE_LOADED);
		put16(s, off + 2, 2 * len);
		non_ascii |= widen(s, pos, len, off + 4);
		off += 4 + 2 * len;
	}
	if (exe) { /* the process's executable, known unless the walk had to cut it */
		len = file_path(s, exe, &pos, &cut);
		if (cut) {
			flags |= IMAGELOAD_EVENT_TRUNCATED;
			cuts |= IMAGELOAD_EXE_CUT;
		} else {
			put16(s, off, TAG_IMAGE);
			put16(s, off + 2, 2 * len);
			non_ascii |= widen(s, pos, len, off + 4);
			off += 4 + 2 * len;
		}
	}
	off &= REC_MASK;
	put16(s, 2, off);
	put16(s, IMAGELOAD_BASE_SIZE, IMAGELOAD_EXTENSION_VERSION);
	put16(s, IMAGELOAD_BASE_SIZE + 2, off - IMAGELOAD_BASE_SIZE);
	*(__u32 *)&s->rec[IMAGELOAD_BASE_SIZE + 4] = flags;
	s->prefix.flags = cuts | (non_ascii ? IMAGELOAD_NON_ASCII : 0);
	s->prefix.reserved = 0;
	if (bpf_ringbuf_output(&imageload_events, &s->prefix, sizeof(s->prefix) + off, 0))
		count_lost(IMAGELOAD_LOST_RING);
}

SEC("tracepoint/syscalls/sys_exit_mmap")
int imageload_mmap_exit(struct syscall_exit *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pending *pp = bpf_map_lookup_elem(&imageload_pending, &id);
	struct task_struct *task;
	struct scratch *s;
	struct span *sp;
	struct file *file;
	struct pending p;
	__u64 addr, base, size;
	__u32 cpu;

	if (!pp)
		return 0;
	p = *pp;
	bpf_map_delete_elem(&imageload_pending, &id);
	addr = ctx->ret;
	if (addr >= (__u64)-MAX_ERRNO)
		return 0; /* mmap failed: nothing was mapped */
	task = (struct task_struct *)bpf_get_current_task();
	file = fd_file(task, p.fd);
	if (!file) {
		if (p.prot & PROT_EXEC)
			count_lost(IMAGELOAD_LOST_FILE); /* closed by another thread meanwhile */
		return 0;
	}
	if (!(p.prot & PROT_EXEC) || p.off == 0) {
		struct span fresh = {
			.file = (__u64)file, .addr = addr, .len = p.len, .reported = !!(p.prot & PROT_EXEC),
		};

		bpf_map_update_elem(&imageload_spans, &id, &fresh, 0 /* BPF_ANY */);
		if (!(p.prot & PROT_EXEC))
			return 0;
		base = addr;
		size = p.len;
	} else {
		base = addr - p.off;
		size = p.len;
		sp = bpf_map_lookup_elem(&imageload_spans, &id);
		if (sp && sp->file == (__u64)file && sp->addr <= addr && addr < sp->addr + sp->len) {
			if (sp->reported)
				return 0; /* a second code segment of an image already reported */
			sp->reported = 1;
			base = sp->addr;
			size = sp->len;
		}
	}
	cpu = bpf_get_smp_processor_id();
	s = bpf_map_lookup_elem(&imageload_scratch, &cpu);
	if (!s) {
		count_lost(IMAGELOAD_LOST_RING);
		return 0;
	}
	emit(s, task, file, base, size);
	return 0;
}

/* --- what exec maps: the program and its interpreter ------------------------------------------------ */

#define AT_NULL 0
#define AT_PHDR 3
#define AT_BASE 7
#define PAGE_SHIFT 12
#define SPAN_STEPS 16 /* mappings of one file followed from its first */

struct vma_info {
	struct file *file;
	__u64 start;
	__u64 end;
	__u64 pgoff;
};

static long vma_seen(struct task_struct *task, struct vm_area_struct *vma, void *arg)
{
	struct vma_info *v = arg;

	v->file = BPF_CORE_READ(vma, vm_file);
	v->start = BPF_CORE_READ(vma, vm_start);
	v->end = BPF_CORE_READ(vma, vm_end);
	v->pgoff = BPF_CORE_READ(vma, vm_pgoff);
	return 0;
}

/* The image whose mapping holds `addr`: base = that mapping's start less its file offset, size = up to the end
 * of the same file's mappings that follow it without a gap. */
static __always_inline void emit_mapped(struct scratch *s, struct task_struct *task, __u64 addr)
{
	struct vma_info v = {};
	struct file *file;
	__u64 base, end;
	long err;

	if (!addr)
		return;
	err = bpf_find_vma(task, addr, vma_seen, &v, 0);
	if (err || !v.file) {
		if (err != -2 /* ENOENT: nothing mapped there */)
			count_lost(IMAGELOAD_LOST_FILE); /* e.g. EBUSY: the mm's lock was taken */
		return;
	}
	file = v.file;
	base = v.start - (v.pgoff << PAGE_SHIFT);
	end = v.end;
	for (int i = 0; i < SPAN_STEPS; i++) {
		v.file = NULL;
		if (bpf_find_vma(task, end, vma_seen, &v, 0) || v.file != file || v.start != end)
			break;
		end = v.end;
	}
	emit(s, task, file, base, end - base);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(imageload_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	struct mm_struct___il *mm = (struct mm_struct___il *)BPF_CORE_READ(task, mm);
	__u32 cpu = bpf_get_smp_processor_id(), n;
	__u64 phdr = 0, interp = 0;
	struct scratch *s = bpf_map_lookup_elem(&imageload_scratch, &cpu);

	if (!s) {
		count_lost(IMAGELOAD_LOST_RING);
		return 0;
	}
	if (!mm)
		return 0;
	n = bpf_core_field_size(mm->saved_auxv);
	if (n > sizeof(s->auxv))
		n = sizeof(s->auxv);
	if (bpf_probe_read_kernel(s->auxv, n, &mm->saved_auxv))
		return 0;
	for (int i = 0; i + 1 < AUXV_WORDS && 8 * (i + 2) <= n; i += 2) {
		__u64 key = s->auxv[i];

		if (key == AT_NULL)
			break;
		if (key == AT_PHDR)
			phdr = s->auxv[i + 1];
		else if (key == AT_BASE)
			interp = s->auxv[i + 1];
	}
	emit_mapped(s, task, phdr);   /* the program (its program headers are in its first mapping) */
	emit_mapped(s, task, interp); /* its interpreter, ld.so: 0 for a static program */
	return 0;
}
