"""Same-host data plane: shared-memory segment files under a tmpfs (normally /dev/shm).

The store creates and removes segments (`SegmentFiles`); writers and readers map them (`SegmentMaps`) with
os.open + mmap directly: multiprocessing.shared_memory's resource tracker would unlink a segment when any
process that touched it exits. Names are `qwenpd-<store id>-<128-bit random hex>`, never derived from
content; files are created O_EXCL with mode 0600 and preallocated, so a full tmpfs fails the allocation
instead of killing a writer with SIGBUS.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from qwenpd.errors import FailedPrecondition, ResourceExhausted

PREFIX = "qwenpd-"
STORE_ID_RE = re.compile(r"^[a-z0-9_]{1,32}$")
SEGMENT_NAME_RE = re.compile(r"^qwenpd-[a-z0-9_]{1,32}-[0-9a-f]{32}$")
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def host_id() -> str:
    """This host's boot id: equal for processes that can share /dev/shm, different across hosts."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


class SegmentFiles:
    """The store's side: creates, removes and cleans up the segment files it owns.

    Holding an exclusive flock on `qwenpd-<store id>.lock` makes the store the only owner of its prefix, so
    removing every `qwenpd-<store id>-*` file at start (orphans of a crashed predecessor) is safe.
    """

    def __init__(self, shm_dir: str | Path, store_id: str):
        if not STORE_ID_RE.match(store_id):
            raise ValueError(f"store id must match {STORE_ID_RE.pattern}, got {store_id!r}")
        self.dir = Path(shm_dir)
        self.store_id = store_id
        self.prefix = f"{PREFIX}{store_id}-"
        self._lock_path = self.dir / f"{PREFIX}{store_id}.lock"
        self._lock_fd: int | None = None
        self._names: set[str] = set()

    def open(self) -> list[str]:
        """Take the store id's lock and remove orphaned segments; return their names."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(f"another live cache store uses store id {self.store_id!r} in {self.dir}: "
                                     "give each deployment its own --store-id", subject="store_id",
                                     reason="STORE_ID_IN_USE") from None
        self._lock_fd = fd
        orphans = sorted(p.name for p in self.dir.iterdir() if p.name.startswith(self.prefix))
        for name in orphans:
            _unlink(self.dir / name)
        return orphans

    def create(self, size: int) -> str:
        """A new segment of `size` bytes, memory reserved; its name."""
        name = f"{self.prefix}{secrets.token_hex(16)}"
        path = self.dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # exact mode whatever the umask
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            _unlink(path)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise ResourceExhausted(f"{self.dir} has no room for a {size}-byte segment",
                                        subject=str(self.dir), retry_after_s=1.0, reason="SHM_FULL") from None
            raise
        os.close(fd)
        self._names.add(name)
        return name

    def remove(self, name: str) -> None:
        self._names.discard(name)
        _unlink(self.dir / name)

    def close(self) -> None:
        """Remove every segment this store made, then release and remove the lock."""
        for name in list(self._names):
            self.remove(name)
        if self._lock_fd is not None:
            _unlink(self._lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(slots=True)
class _SegmentMapping:
    mm: mmap.mmap
    inode: tuple[int, int]


class SegmentMaps:
    """A process's mappings of store segments, kept across checkpoints: mapping a range anew costs page
    faults on every page, about as much as copying it. Readers map read-only, writers read-write.

    A mapping of a segment the store has removed keeps its memory alive, so mappings whose file is gone are
    closed whenever a new segment is mapped, and all of them on close().
    """

    def __init__(self, shm_dir: str | Path, writable: bool):
        self.dir = Path(shm_dir)
        self.writable = writable
        self._maps: dict[str, _SegmentMapping] = {}
        self._zombies: list[mmap.mmap] = []  # closed later: buffers exported from them were still alive
        self._lock = threading.Lock()  # the async client reads and writes from worker threads

    def view(self, name: str, offset: int, length: int) -> memoryview:
        """The byte range [offset, offset + length) of segment `name`."""
        with self._lock:
            mapping = self._maps.get(name) or self._map(name)
        if offset < 0 or length < 0 or offset + length > len(mapping.mm):
            raise FailedPrecondition(f"range {offset}+{length} lies outside segment {name} ({len(mapping.mm)} bytes)",
                                     subject=name, reason="BAD_SEGMENT_RANGE")
        return memoryview(mapping.mm)[offset:offset + length]

    def _map(self, name: str) -> _SegmentMapping:
        if not SEGMENT_NAME_RE.match(name):
            raise FailedPrecondition(f"not a cache store segment name: {name!r}", subject=name,
                                     reason="BAD_SEGMENT_NAME")
        self.prune()
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.dir / name, flags)
        except FileNotFoundError:
            raise FailedPrecondition(f"segment {name} not found in {self.dir}: is the cache store on another host "
                                     "or in another /dev/shm namespace?", subject=name,
                                     reason="SEGMENT_UNREACHABLE") from None
        try:
            st = os.fstat(fd)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
            # populate: fault the whole segment in now, once, rather than page by page inside hand-offs
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=prot)
        finally:
            os.close(fd)
        mapping = _SegmentMapping(mm, (st.st_dev, st.st_ino))
        self._maps[name] = mapping
        return mapping

    def prune(self) -> None:
        """Close mappings whose segment file is gone (or replaced). Called with the lock held."""
        for name, mapping in list(self._maps.items()):
            try:
                st = os.stat(self.dir / name, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == mapping.inode:
                    continue
            except FileNotFoundError:
                pass
            del self._maps[name]
            self._zombies.append(mapping.mm)
        self._close_zombies()

    def close(self) -> None:
        with self._lock:
            self._zombies.extend(m.mm for m in self._maps.values())
            self._maps.clear()
            self._close_zombies()

    def _close_zombies(self) -> None:
        alive = []
        for mm in self._zombies:
            try:
                mm.close()
            except BufferError:  # tensors or views still point into it
                alive.append(mm)
        self._zombies = alive

    def __len__(self) -> int:
        return len(self._maps)
