"""Hashes of the executable a process ran, in Sysmon's form (``MD5=<HEX>,SHA256=<HEX>``), as a stage between the
source and the ring.

Off (the default) it is not in the pipeline at all: nothing is paid per record. On (``Monitor(hashes=...)``,
``tail --hashes``, a configuration's ``<HashAlgorithms>``), for each ProcessCreate/ProcessExec that says which
file ran (its ExeDevice and ExeInode fields, read in the kernel by the bpf source):

1. the file is opened as the one the kernel saw: ``/proc/<pid>/exe`` (the task's own reference: a rename or a
   new file at the path cannot swap it), else, when the process is already gone, the record's Image path
   without following a symlink, through an O_PATH descriptor so nothing but a regular file is ever opened for
   reading; either way it is used only when its device and inode are the record's, and not when the file
   changed (ctime) after the event;
2. its hashes come from a cache keyed by (device, inode, size, mtime, ctime) — a file rewritten in place changes
   the key — bounded to ``max_entries`` (least recently used out; each entry ~0.3 KiB);
3. on a miss the open descriptor goes to one worker thread, which reads and hashes it; the source's thread waits
   for it at most ``wait`` seconds (2 ms: a typical binary is done by then), and a record whose hashes are not
   ready by then is written with EventFlags.HASH_PENDING (the same file's next records carry them). A file
   that cannot be hashed (gone, a memory file whose process ended, changed since, bigger than ``max_file_bytes``)
   is marked EventFlags.NO_HASH. Nothing is guessed.

An ImageLoad (opt-in, ``image_loads=True``) is hashed the same way, the file being the loaded library: it is
found by its path (the extension block's whole ImageLoaded when ImageFileName was cut, else ImageFileName),
opened without following a final symlink and used only when fstat says it is the record's device and inode (a
file swapped in at that path is NO_HASH, never hashed in its place); same cache, worker and flags.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import struct
import threading
from collections import OrderedDict
from typing import Iterable

import numpy as np

from .records import IMAGE_LOAD_DTYPE, EventFlags, ExtensionTag, block_fields, pack_field, with_packed

__all__ = ["ALGORITHMS", "parse_algorithms", "HashCache", "HashStage", "file_hashes", "DEFAULT_MAX_ENTRIES"]

log = logging.getLogger(__name__)

#: What etwmon computes, in the order Sysmon's ``Hashes`` lists them, by Sysmon's name → hashlib's.
ALGORITHMS: dict[str, str] = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256"}
#: Sysmon algorithms etwmon cannot compute (IMPHASH hashes a PE import table: Windows files only).
_NOT_HERE = {"IMPHASH": "IMPHASH hashes a Windows PE import table"}
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_FILE_BYTES = 1 << 30
DEFAULT_WAIT = 0.002
_CHUNK = 1 << 20
_QUEUE = 256

_TAG = int(ExtensionTag.Hashes)
_DEV, _INO, _IMAGE = int(ExtensionTag.ExeDevice), int(ExtensionTag.ExeInode), int(ExtensionTag.Image)
_LOADED = int(ExtensionTag.ImageLoaded)
_LATE_TAGS = (int(ExtensionTag.ParentImage), int(ExtensionTag.ParentUser), int(ExtensionTag.ParentCommandLine))
_PENDING, _NO_HASH = int(EventFlags.HASH_PENDING), int(EventFlags.NO_HASH)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_EPOCH_DIFF = 116_444_736_000_000_000  # FILETIME ticks from 1601 to 1970
_O_PATH = getattr(os, "O_PATH", 0)
_IMAGE_NAME_AT = IMAGE_LOAD_DTYPE.fields["ImageFileName"][1]
_IMAGE_NAME_END = _IMAGE_NAME_AT + IMAGE_LOAD_DTYPE.fields["ImageFileName"][0].itemsize


def parse_algorithms(spec: str | Iterable[str] | None, strict: bool = True) -> tuple[tuple[str, ...], list[str]]:
    """(Sysmon names in Sysmon's order, what was left out and why) from ``"sha256,md5"``, ``"*"`` (all etwmon
    computes) or a list. An unknown name raises ValueError; IMPHASH too when ``strict`` (a configuration's
    ``<HashAlgorithms>`` is not strict: it is left out with the reason)."""
    if spec is None:
        return (), []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    wanted: set[str] = set()
    skipped: list[str] = []
    for item in items:
        name = item.strip().upper()
        if not name:
            continue
        if name == "*":
            wanted.update(ALGORITHMS)
        elif name in ALGORITHMS:
            wanted.add(name)
        elif name in _NOT_HERE and not strict:
            skipped.append(f"{name}: {_NOT_HERE[name]}")
        else:
            raise ValueError(f"unknown hash algorithm {item.strip()!r}; etwmon computes "
                             f"{', '.join(ALGORITHMS)} (or * for all)")
    return tuple(n for n in ALGORITHMS if n in wanted), skipped


def file_hashes(fd: int, algorithms: tuple[str, ...], size_limit: int = DEFAULT_MAX_FILE_BYTES) -> str | None:
    """Sysmon's ``MD5=<HEX>,SHA256=<HEX>`` of the file open at ``fd``, read from its start; None when it is bigger
    than ``size_limit``."""
    digests = [hashlib.new(ALGORITHMS[name]) for name in algorithms]
    offset = 0
    while True:
        chunk = os.pread(fd, _CHUNK, offset)
        if not chunk:
            break
        offset += len(chunk)
        if offset > size_limit:
            return None
        for digest in digests:
            digest.update(chunk)
    return ",".join(f"{name}={digest.hexdigest().upper()}" for name, digest in zip(algorithms, digests))


class HashCache:
    """Hashes by (device, inode, size, mtime_ns, ctime_ns), at most ``max_entries``, least recently used out."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, str | None] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted = 0

    def get(self, key: tuple) -> tuple[bool, str | None]:
        with self._lock:
            if key not in self._entries:
                return False, None
            self._entries.move_to_end(key)
            return True, self._entries[key]

    def put(self, key: tuple, value: str | None) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self.evicted += 1

    def __len__(self) -> int:
        return len(self._entries)


def _stat_of(path: str, follow: bool) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=follow)
    except (OSError, ValueError):  # ValueError: a NUL in a path
        return None


def _open_verified(pid: int | None, image: str | None, device: int,
                   inode: int) -> tuple[int, os.stat_result] | None:
    """A read-only descriptor of the file (device, inode) the record names, and its stat; None if neither the
    task's exe (``pid``; None: by the path only, as for a loaded library) nor the path leads to that very file."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    fd = -1
    if pid is not None:
        try:
            fd = os.open(f"/proc/{pid}/exe", flags)  # an exec'd file: a regular file, whatever its path is now
        except OSError:
            fd = -1
    if fd >= 0:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (device, inode) and stat.S_ISREG(st.st_mode):
            return fd, st
        os.close(fd)
    if not image or not image.startswith("/") or not _O_PATH:
        return None
    try:  # O_PATH: no open() side effects whatever is there; reopened only once it is the right regular file
        ref = os.open(image, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        st = os.fstat(ref)
        if (st.st_dev, st.st_ino) != (device, inode) or not stat.S_ISREG(st.st_mode):
            return None
        try:
            fd = os.open(f"/proc/self/fd/{ref}", flags)
        except OSError:
            return None
        return fd, os.fstat(fd)
    finally:
        os.close(ref)


class HashStage:
    """The hashing stage (see the module's text): ``attach(sink)`` returns the sink a source pushes into."""

    #: Creates and execs come one by one (the identity stage keeps them out of batches): each names a file to hash.
    batch_creates = False

    def __init__(self, algorithms: str | Iterable[str], *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 wait: float = DEFAULT_WAIT, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
        self.algorithms, _ = parse_algorithms(algorithms)
        if not self.algorithms:
            raise ValueError("no hash algorithm asked for")
        self.cache = HashCache(max_entries)
        self.wait = wait
        self.max_file_bytes = max_file_bytes
        self._jobs: queue.Queue = queue.Queue(_QUEUE)
        self._pending: dict[tuple, threading.Event] = {}
        self._pending_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.counts = {"hashed": 0, "cache_hits": 0, "pending": 0, "no_hash": 0, "queue_full": 0}

    def attach(self, sink) -> "HashStage":
        self._push = sink.push
        self.push_lost = sink.push_lost
        self.notify = sink.notify
        self._push_batch = getattr(sink, "push_batch", None)
        if self._push_batch is None:  # the sink takes records one by one: so does this stage
            self.push_batch = self._batch_one_by_one  # type: ignore[method-assign]
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="etwmon-hashes", daemon=True)
            self._worker.start()
        return self

    def close(self) -> None:
        """End the worker (pending descriptors are closed)."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(5)
            self._worker = None

    def stats(self) -> dict[str, int]:
        return {**self.counts, "cached": len(self.cache), "evicted": self.cache.evicted}

    # -- the source's thread -----------------------------------------------------------------------------

    def push(self, record) -> None:
        item = record[0] | (record[1] << 8)
        if item != 1 and item != 101 and item != 5:
            self._push(record)
            return
        self._push(self.hashed(bytes(record)))

    def push_batch(self, data, ends) -> None:
        """Records back to back in ``data`` (``ends``: where each ends): thread records and exits pass on as they
        are, in one batch; a batch holding image loads (or process records) has those hashed first."""
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data
        raw = np.frombuffer(view, dtype=np.uint8)
        ends = np.asarray(ends, dtype=np.int64)
        starts = np.concatenate(([0], ends[:-1])) if len(ends) else ends
        types = raw[starts] if len(ends) else raw[:0]
        if not ((types == 1) | (types == 101) | (types == 5)).any():
            self._push_batch(data, ends)
            return
        records = [raw[a:b].tobytes() for a, b in zip(starts.tolist(), ends.tolist())]
        records = [self.hashed(r) if r[0] in (1, 101, 5) and r[1] == 0 else r for r in records]
        self._push_batch(b"".join(records), np.cumsum([len(r) for r in records]))

    def _batch_one_by_one(self, data, ends) -> None:
        start = 0
        for end in np.asarray(ends, dtype=np.int64).tolist():
            self.push(memoryview(data).cast("B")[start:end].tobytes())
            start = end

    def hashed(self, record: bytes) -> bytes:
        """``record`` (a ProcessCreate/ProcessExec: its executable's; an ImageLoad: the loaded file's) with its
        Hashes field, or HASH_PENDING / NO_HASH in its flags."""
        flags, fields = block_fields(record, packed=True)
        values = {tag: value[4:] for tag, value in fields}
        if _DEV not in values or _INO not in values:
            return record  # the source does not say which file ran: nothing to hash it by
        device, inode = _U32.unpack(values[_DEV])[0], _U64.unpack(values[_INO])[0]
        when_ns = (_I64.unpack_from(record, 8)[0] - _EPOCH_DIFF) * 100
        pid: int | None
        if record[0] == 5 and record[1] == 0:  # the loaded library, by its path only (its process ran another file)
            pid = None
            if _LOADED in values:
                image = values[_LOADED].decode("utf-16-le", "surrogatepass")
            else:
                name = record[_IMAGE_NAME_AT:_IMAGE_NAME_END].decode("utf-16-le", "surrogatepass")
                image = name.split("\0", 1)[0]
        else:
            pid = _U32.unpack_from(record, 16)[0]
            image = values[_IMAGE].decode("utf-16-le", "surrogatepass") if _IMAGE in values else None
        text = self._lookup(pid, image, device, inode, when_ns)
        if isinstance(text, str):
            at = next((i for i, (tag, _) in enumerate(fields) if tag in _LATE_TAGS), len(fields))
            packed = [value for _, value in fields]
            packed.insert(at, pack_field(_TAG, text.encode("utf-16-le")))
            return with_packed(record, flags, packed)
        self.counts["pending" if text is _PENDING else "no_hash"] += 1
        return with_packed(record, flags | text, [value for _, value in fields])

    def _lookup(self, pid: int | None, image: str | None, device: int, inode: int, when_ns: int) -> str | int:
        # The common case, a file hashed before: a stat of the task's exe, or of the path (without following a
        # symlink) once the process is gone; no descriptor. Only the very inode, unchanged, finds the entry.
        st = None if pid is None else _stat_of(f"/proc/{pid}/exe", True)
        if (st is None or (st.st_dev, st.st_ino) != (device, inode)) and image and image.startswith("/"):
            st = _stat_of(image, False)
        if st is not None and (st.st_dev, st.st_ino) == (device, inode) and st.st_ctime_ns <= when_ns:
            found, text = self.cache.get((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            if found:
                self.counts["cache_hits"] += 1
                return text if text is not None else _NO_HASH
        try:
            opened = _open_verified(pid, image, device, inode)
        except OSError:
            opened = None
        if opened is None:
            return _NO_HASH
        fd, st = opened
        if st.st_ctime_ns > when_ns:  # written (or its metadata changed) after the event: not what ran
            os.close(fd)
            return _NO_HASH
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        found, text = self.cache.get(key)
        if found:
            os.close(fd)
            self.counts["cache_hits"] += 1
            return text if text is not None else _NO_HASH
        with self._pending_lock:
            done = self._pending.get(key)
            if done is None:
                done = self._pending[key] = threading.Event()
                try:
                    self._jobs.put_nowait((key, fd, done))
                    fd = -1
                except queue.Full:  # the worker is far behind: not hashed, said so
                    del self._pending[key]
                    self.counts["queue_full"] += 1
                    os.close(fd)
                    return _NO_HASH
        if fd >= 0:
            os.close(fd)
        if done.wait(self.wait):
            found, text = self.cache.get(key)
            if found:
                return text if text is not None else _NO_HASH
        return _PENDING

    # -- the worker ----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            key, fd, done = job
            try:
                text = file_hashes(fd, self.algorithms, self.max_file_bytes)
            except OSError as exc:
                log.debug("cannot hash %s: %s", key, exc)
                text = None
            finally:
                os.close(fd)
            self.cache.put(key, text)
            self.counts["hashed"] += 1
            with self._pending_lock:
                self._pending.pop(key, None)
            done.set()
        while True:  # descriptors of jobs never started
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                os.close(job[1])
