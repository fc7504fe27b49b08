/* The path walk both programs use (d_path's, bounded): from a dentry up to the root of its mount namespace, one
 * component per bpf_loop step (a loop in one program would make the verifier follow every mix of mount crossings
 * and names: too many states). bpf_d_path is not allowed in tp_btf programs.
 *
 * Include after the program's `struct scratch` (with a `char path[]` of at least ETWMON_WALK_MAX + NAME_MAX + 1
 * bytes), with ETWMON_WALK_MAX (a power of two: the path is built backwards, ending there) and ETWMON_WALK_ROOM
 * (bytes the walk leaves free at the start of the buffer) defined.
 */
#ifndef ETWMON_PATH_H
#define ETWMON_PATH_H

struct walk {
	struct scratch *s;
	struct dentry *dentry;
	struct vfsmount *vfsmnt;
	struct mount *mnt;
	__u32 pos; /* the path so far is s->path[pos..ETWMON_WALK_MAX) */
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
	if (len > NAME_MAX || len + 1 + ETWMON_WALK_ROOM >= pos) {
		w->end = 2;
		return 1;
	}
	pos -= len;
	bpf_probe_read_kernel(&s->path[pos & (ETWMON_WALK_MAX - 1)], len & NAME_MAX, name);
	pos -= 1;
	s->path[pos & (ETWMON_WALK_MAX - 1)] = '/';
	w->pos = pos;
	w->dentry = parent;
	return 0;
}

#endif
