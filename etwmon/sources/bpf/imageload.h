/* What imageload.bpf.c shares with its reader (etwmon/sources/bpf/imageload.py mirrors every number here), and the
 * few kernel types it reads beyond etwmon_kernel.h's, declared CO-RE style (preserve_access_index; libbpf ignores
 * a "___il" suffix when it matches a type against the kernel's BTF, so these add fields to types
 * etwmon_kernel.h declares without redefining them).
 *
 * Each sample in the image-load ring is an 8-byte prefix (struct imageload_prefix) followed by one finished
 * wire record: the book's ImageLoadInfo (ItemHeader Type 5, Size, Time as FILETIME; ProcessId, ImageSize,
 * LoadAddress, ImageFileName WCHAR[301]; 640 bytes) and the extension block (records.py) at offset 640.
 */
#ifndef IMAGELOAD_H
#define IMAGELOAD_H

/* struct imageload_prefix.flags */
#define IMAGELOAD_NON_ASCII 0x1 /* a text holds bytes >= 0x80, written as the UTF-16 units 0xDC80..0xDCFF
				 * (Python's surrogate escapes): the reader decodes them as UTF-8 on this record */
#define IMAGELOAD_PATH_CUT 0x2  /* the loaded file's path was cut by the walk (TRUNCATION_MARKER in front) */
#define IMAGELOAD_EXE_CUT 0x4   /* the process's executable was cut by the walk (Image left out) */

/* The record (records.py IMAGE_LOAD_DTYPE and the extension block). */
#define IMAGELOAD_TYPE 5
#define IMAGELOAD_NAME_OFFSET 32
#define IMAGELOAD_NAME_CHARS 300      /* WCHAR[301]: 300 characters and the NUL */
#define IMAGELOAD_NAME_KEEP 288       /* characters kept before the marker when a name is cut */
#define IMAGELOAD_BASE_SIZE 640       /* sizeof(ImageLoadInfo): the extension block starts here */
#define IMAGELOAD_EXTENSION_VERSION 1
#define IMAGELOAD_EVENT_TRUNCATED 0x1 /* records.EventFlags.TRUNCATED */

/* Extension tags (records.ExtensionTag). */
#define TAG_PROCESS_GUID 1
#define TAG_IMAGE 3 /* the process's executable */
#define TAG_EXE_DEVICE 17   /* u32: st_dev of the record's file (here the loaded file), as stat(2) gives it */
#define TAG_EXE_INODE 18    /* u64: st_ino of the record's file (the loaded file) */
#define TAG_IMAGE_LOADED 25 /* text: the loaded file's whole path, when ImageFileName had to cut it */

#define IMAGELOAD_PATH_MAX 4096 /* bytes of a path the walk builds (the marker's room included) */
#define IMAGELOAD_PATH_DEPTH 64 /* components walked up from a dentry */

struct imageload_prefix {
	__u32 flags; /* IMAGELOAD_NON_ASCII */
	__u32 reserved;
};

/* Set by the loader before load (.rodata): what makes ProcessGuids and FILETIMEs in the kernel. */
struct imageload_config {
	__u8 guid_prefix[8]; /* identity.guid_prefix(host_and_boot_id()) */
	__s64 offset_ns;     /* wall clock minus CLOCK_BOOTTIME (clock.KernelClock(CLOCK_BOOTTIME).offset_ns) */
};

/* Losses, one slot each in the per-CPU array `imageload_lost`. */
#define IMAGELOAD_LOST_RING 0    /* the ring had no room for the record */
#define IMAGELOAD_LOST_PENDING 1 /* an executable mmap could not be remembered from entry to exit (map full) */
#define IMAGELOAD_LOST_FILE 2    /* the descriptor no longer named a file when mmap returned, or (at exec) the
				  * mapping could not be looked up (bpf_find_vma failed, e.g. EBUSY) */
#define IMAGELOAD_LOST_SLOTS 3

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

/* struct super_block and struct inode (s_dev, i_ino, i_sb): etwmon_kernel.h */

struct file___il {
	struct inode *f_inode;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	struct fdtable *fdt;
};

struct task_struct___il {
	struct files_struct *files;
};

struct vm_area_struct {
	unsigned long vm_start;
	unsigned long vm_end;
	unsigned long vm_pgoff;
	struct file *vm_file;
};

struct mm_struct___il {
	unsigned long saved_auxv[2];
};

#pragma clang attribute pop

#endif /* IMAGELOAD_H */
