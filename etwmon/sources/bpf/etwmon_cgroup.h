/* The task's cgroup path, read in the kernel at the event: a short-lived container's cgroup is removed before
 * user space could look its id up. Included by etwmon.bpf.c after etwmon_kernel.h and the bpf headers.
 *
 * Which hierarchy: the v2 (unified) one when the task sits below its root; otherwise (a v1-only runtime, or a
 * hybrid machine whose v2 hierarchy nobody uses) the first v1 hierarchy, of the pids then the memory
 * controller, where the task sits below the root; otherwise "/". The path is absolute in that hierarchy (not
 * relative to the task's cgroup namespace), as the host sees it: "/system.slice/docker-<id>.scope",
 * "/docker/<id>". The names are walked up the kernfs nodes one per bpf_loop step, like the dentry walk.
 * Types are CO-RE flavors (___etwmon) so they do not clash with etwmon_kernel.h's.
 */
#ifndef ETWMON_CGROUP_H
#define ETWMON_CGROUP_H

#define ETWMON_CGROUP_NAME_MAX 256 /* kernfs (cgroup) names are at most NAME_MAX bytes */

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct kernfs_node___etwmon {
	struct kernfs_node *__parent; /* Linux 6.15+ */
	const char *name;
};

struct kernfs_node___etwmon_old {
	struct kernfs_node *parent; /* before Linux 6.15 */
};

struct cgroup_subsys_state___etwmon {
	struct cgroup *cgroup;
};

struct css_set___etwmon {
	struct cgroup_subsys_state___etwmon *subsys[1];
};

#pragma clang attribute pop

enum cgroup_subsys_id {
	memory_cgrp_id = 4,
	pids_cgrp_id = 11,
};

static __always_inline struct kernfs_node *cgroup_kn_parent(struct kernfs_node *kn)
{
	struct kernfs_node___etwmon *node = (void *)kn;

	if (bpf_core_field_exists(node->__parent))
		return BPF_CORE_READ(node, __parent);
	return BPF_CORE_READ((struct kernfs_node___etwmon_old *)kn, parent);
}

/* The kernfs node of the task's cgroup in the v1 hierarchy of controller `id`, or NULL when the controller is
 * not in this kernel or the task is at that hierarchy's root. */
static __always_inline struct kernfs_node *cgroup_v1_kn(struct css_set___etwmon *cset, __u32 id)
{
	struct cgroup_subsys_state___etwmon *css = NULL;
	struct kernfs_node *kn;

	if (id >= 16)
		return NULL;
	bpf_core_read(&css, sizeof(css), &cset->subsys[id]);
	if (!css)
		return NULL;
	kn = BPF_CORE_READ(css, cgroup, kn);
	return kn && cgroup_kn_parent(kn) ? kn : NULL;
}

struct cgroup_walk {
	char *path;             /* the path is built backwards in path[pos..ETWMON_PATH_MAX) */
	struct kernfs_node *kn;
	__u32 pos;
	__u32 end;              /* 1: reached the root; 2: too long */
};

static long cgroup_step(__u32 index, void *arg)
{
	struct cgroup_walk *w = arg;
	struct kernfs_node *kn = w->kn;
	struct kernfs_node *parent = cgroup_kn_parent(kn);
	char name[ETWMON_CGROUP_NAME_MAX];
	long n;
	__u32 len, pos;

	if (!parent) {
		w->end = 1; /* the hierarchy's root: its own name is not part of the path */
		return 1;
	}
	n = bpf_probe_read_kernel_str(name, sizeof(name), BPF_CORE_READ((struct kernfs_node___etwmon *)kn, name));
	if (n <= 1) {
		w->end = 2;
		return 1;
	}
	len = n - 1;
	pos = w->pos;
	if (len >= ETWMON_CGROUP_NAME_MAX || len + 1 >= pos) {
		w->end = 2;
		return 1;
	}
	pos -= len;
	bpf_probe_read_kernel(&w->path[pos & (ETWMON_PATH_MAX - 1)], len & (ETWMON_CGROUP_NAME_MAX - 1), name);
	pos -= 1;
	w->path[pos & (ETWMON_PATH_MAX - 1)] = '/';
	w->pos = pos;
	w->kn = parent;
	return 0;
}

/* The task's cgroup path (see above) built at the end of `path` (ETWMON_PATH_MAX + ETWMON_CGROUP_NAME_MAX bytes
 * of room); returns where it starts in `path` (its length is ETWMON_PATH_MAX - start), or ETWMON_PATH_MAX when
 * it is deeper than ETWMON_PATH_DEPTH or longer than ETWMON_PATH_MAX (ETWMON_CGROUP_TRUNCATED set in *flags).
 * ETWMON_CGROUP_V1 is set when it is a v1 hierarchy's path. */
static __always_inline __u32 read_cgroup_path(struct task_struct *task, char *path, __u16 *flags)
{
	struct css_set___etwmon *cset = (void *)BPF_CORE_READ(task, cgroups);
	struct cgroup_walk w = {.path = path, .pos = ETWMON_PATH_MAX, .end = 0};
	struct kernfs_node *kn = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn);

	if (!cset)
		return ETWMON_PATH_MAX;
	if (!kn || !cgroup_kn_parent(kn)) { /* at the v2 root: a v1 hierarchy may say more */
		struct kernfs_node *v1 = NULL;

		if (bpf_core_enum_value_exists(enum cgroup_subsys_id, pids_cgrp_id))
			v1 = cgroup_v1_kn(cset, bpf_core_enum_value(enum cgroup_subsys_id, pids_cgrp_id));
		if (!v1 && bpf_core_enum_value_exists(enum cgroup_subsys_id, memory_cgrp_id))
			v1 = cgroup_v1_kn(cset, bpf_core_enum_value(enum cgroup_subsys_id, memory_cgrp_id));
		if (v1) {
			kn = v1;
			*flags |= ETWMON_CGROUP_V1;
		}
	}
	if (!kn)
		return ETWMON_PATH_MAX;
	w.kn = kn;
	bpf_loop(ETWMON_PATH_DEPTH, cgroup_step, &w, 0);
	if (w.end != 1) {
		*flags |= ETWMON_CGROUP_TRUNCATED;
		return ETWMON_PATH_MAX;
	}
	if (w.pos == ETWMON_PATH_MAX) { /* the root itself */
		w.pos -= 1;
		path[ETWMON_PATH_MAX - 1] = '/';
	}
	return w.pos;
}

#endif /* ETWMON_CGROUP_H */
