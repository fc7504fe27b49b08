/* The few kernel types etwmon.bpf.c reads, declared by hand instead of a generated vmlinux.h: only the fields
 * used, marked preserve_access_index so clang emits CO-RE relocations and libbpf fixes every offset against
 * the running kernel's BTF (/sys/kernel/btf/vmlinux) at load time. Field order and sizes here do not matter.
 */
#ifndef ETWMON_KERNEL_H
#define ETWMON_KERNEL_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;
typedef int pid_t;
#define true 1
#define false 0

/* The map types and flags the program uses (include/uapi/linux/bpf.h). */
enum bpf_map_type {
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_RINGBUF = 27,
};

/* Ring buffer wake-up flags and queries, and the timer the wake-ups are paced with (include/uapi/linux/bpf.h,
 * include/uapi/linux/time.h). struct bpf_timer must carry this name: the verifier finds it in the map's BTF. */
#define BPF_RB_NO_WAKEUP (1ULL << 0)
#define BPF_RB_FORCE_WAKEUP (1ULL << 1)
#define BPF_RB_AVAIL_DATA 0
#define BPF_RB_RING_SIZE 1
#define CLOCK_MONOTONIC 1
struct bpf_timer {
	__u64 __opaque[2];
} __attribute__((aligned(8)));

#define SIGNAL_GROUP_EXIT 0x00000004 /* include/linux/sched/signal.h */

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

typedef struct { int counter; } atomic_t;
typedef struct { __u32 val; } kuid_t;
typedef struct { __u32 val; } kgid_t;

struct qstr {
	union {
		struct {
			__u32 hash;
			__u32 len;
		};
		__u64 hash_len;
	};
	const unsigned char *name;
};

struct dentry {
	struct dentry *d_parent;
	struct qstr d_name;
};

struct vfsmount {
	struct dentry *mnt_root;
};

struct mount {
	struct mount *mnt_parent;
	struct dentry *mnt_mountpoint;
	struct vfsmount mnt;
};

struct path {
	struct vfsmount *mnt;
	struct dentry *dentry;
};

struct super_block {
	__u32 s_dev;
	unsigned long s_magic;
};

struct inode {
	unsigned short i_mode;
	unsigned int i_nlink;
	unsigned long i_ino;
	struct super_block *i_sb;
};

struct file {
	struct path f_path;
	struct inode *f_inode;
};

struct fs_struct {
	struct path pwd;
};

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
	struct file *exe_file;
};

struct cred {
	kuid_t uid;
	kgid_t gid;
	kuid_t euid;
	kgid_t egid;
};

struct tty_struct {
	char name[64];
};

struct task_struct;

struct signal_struct {
	atomic_t live;
	unsigned int flags;
	int group_exit_code;
	struct task_struct *group_exec_task;
	struct tty_struct *tty;
};

/* Before Linux 5.17 the exec'ing thread was signal->group_exit_task. */
struct signal_struct___old {
	struct task_struct *group_exit_task;
};

struct kernfs_node {
	__u64 id;
};

struct cgroup {
	struct kernfs_node *kn;
};

struct css_set {
	struct cgroup *dfl_cgrp;
};

struct ns_common {
	unsigned int inum;
};

struct mnt_namespace {
	struct ns_common ns;
};

struct pid_namespace {
	struct ns_common ns;
};

struct nsproxy {
	struct mnt_namespace *mnt_ns;
};

struct upid {
	int nr;
	struct pid_namespace *ns;
};

struct pid {
	unsigned int level;
	struct upid numbers[1];
};

struct task_struct {
	pid_t pid;
	pid_t tgid;
	int exit_code;
	char comm[16];
	__u64 start_boottime;
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct mm_struct *mm;
	struct signal_struct *signal;
	const struct cred *real_cred;
	const struct cred *cred;
	struct fs_struct *fs;
	struct css_set *cgroups;
	struct nsproxy *nsproxy;
	struct pid *thread_pid;
	kuid_t loginuid;
	unsigned int sessionid;
};

struct linux_binprm {
	struct file *file;
	const char *filename;
};

#pragma clang attribute pop

/* The maps both programs declare alike: arrays with u32 keys (a per-CPU scratch buffer, settings, loss
 * counters), hash maps with u64 keys, and a ring buffer (the loader sets its size). */
#define ETWMON_MAP(name, kind, entries, key_type, value_type) \
	struct { \
		__uint(type, kind); \
		__uint(max_entries, entries); \
		__type(key, key_type); \
		__type(value, value_type); \
	} name SEC(".maps")
#define ETWMON_RINGBUF_MAP(name) \
	struct { \
		__uint(type, BPF_MAP_TYPE_RINGBUF); \
		__uint(max_entries, 1 << 22); \
	} name SEC(".maps")

#endif /* ETWMON_KERNEL_H */
