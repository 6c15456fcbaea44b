"""Real reclaim: each guest's RAM is a sparse file in a tmpfs; freed ranges become holes.

With ``--ram-dir DIR`` the host creates ``DIR/<guest>.ram`` (pages x 4096 bytes, sparse)
and the guest maps it MAP_SHARED, as a VMM backs guest RAM with a memfd or a hugetlbfs
file. When the guest reports or inflates pages, the host punches holes over them —
``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``, the file-side twin of the
``madvise(MADV_REMOVE)`` QEMU's virtio-balloon issues on shared memory. tmpfs gives the
pages back to the kernel at once and a later read sees zeros, which is why reported
pages count as uninitialized in the guest (docs: free page reporting). Note that shmem
has no shared zero page: even a *read* of a hole through a MAP_SHARED mapping allocates
a page again, so a guest must not read pages it has reported (canary sweeps skip them).

Why fallocate and not madvise: bench/inflate.py measures both on a populated tmpfs file
(docs/PERFORMANCE.md ``## Inflate``). For the ranges the host actually punches — merged
order-9 reports and large inflate ranges — fallocate is as fast or faster (2 MiB ranges:
248 vs 269 µs per call; one 256 MiB range: 17 vs 26 ms); madvise wins only on scattered
4 KiB ranges (2.5 vs 5.4 µs per call, mostly the ctypes call), which merged batches rarely
are. And fallocate needs only the file descriptor, so the host never maps guest RAM
(1024 guests x 8 GiB would be 8 TiB of host address space). ``madvise_remove`` is kept
for the raw baseline of bench/inflate.py.

Safety: the file name comes only from a valid guest id (``shared.messages.valid_guest_id``),
it is opened relative to the RAM directory's descriptor with O_NOFOLLOW, and it must be
a regular file with a single link — a symlink or a hard link planted in the directory
cannot make the host truncate or punch another file. A provisioned guest's own file (the
inventory's ``ram_file``) is opened only under a directory the host was given for VM RAM,
through no symlink, with one link and an expected owner (``VmRamDirs``). Reclaimed bytes
are read back from the kernel (``st_blocks``), never computed from what was asked.

Proof of reclaim: every discard counts the bytes asked (``requested``) and the bytes the
kernel really gave back (``released``: ``st_blocks`` before minus after). Asking to free a
range that was already a hole (never touched, or reported before) releases nothing and is
fine; but when a discard released less than it asked, the ranges are checked again with
``SEEK_DATA``/``SEEK_HOLE``: data still there after the punch (``unreleased``) means the
discard did not work — as ``MADV_DONTNEED`` on a shared memfd "succeeds" and frees
nothing — and is counted and logged. Metrics: ``balloon_discard_*`` (metrics.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import stat
import time
from pathlib import Path

import numpy as np

from shared.messages import valid_guest_id
from shared.ranges import sort_and_coalesce
from shared.vocabulary import PAGE_SIZE

log = logging.getLogger("balloon.host.reclaim")

#: At most one "discard released nothing" warning per file per this many seconds.
WARN_EVERY_S = 10.0
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SUFFIX = ".ram"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class RamDirError(Exception):
    """The RAM directory or a file in it is not what the host can safely use."""


def validate_ram_dir(ram_dir: Path | str) -> Path:
    """Resolve ``--ram-dir`` once at startup: an existing, writable, real directory."""
    path = Path(ram_dir)
    if path.is_symlink():
        raise RamDirError(f"--ram-dir {path} is a symlink; give the real directory")
    if not path.is_dir():
        raise RamDirError(f"--ram-dir {path} is not an existing directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RamDirError(f"--ram-dir {path} is not writable")
    return path.resolve()


class VmRamDirs:
    """Where the host may punch a provisioned guest's ``ram_file``, and nowhere else.

    The admin API and ``--guests`` name the file, so whoever can call them could otherwise
    make the host (often root) punch holes in any file it can write. A ram_file must be:

    - under one of the directories the operator gave for VM RAM (``--ram-dir``,
      ``--vm-ram-dirs``), resolved once when the host starts;
    - reached from that directory without any symlink: each component is opened with
      ``openat(O_NOFOLLOW)`` from its parent's descriptor, so a link planted (or swapped in)
      anywhere on the way is refused rather than followed;
    - a regular file with a single link (a hard link to a file elsewhere is refused);
    - owned by the host's own user or by the owner of that directory: handing a directory
      to the VMM's user (``chown qemu DIR``) is how its files are allowed.
    """

    def __init__(self, dirs=()) -> None:
        pairs: list[tuple[Path, Path]] = []
        for given in dirs:
            given = Path(os.path.normpath(given))
            real = Path(os.path.realpath(given))
            if all(real != r for _, r in pairs):
                pairs.append((given, real))
        self._dirs = tuple(pairs)

    @property
    def dirs(self) -> tuple[Path, ...]:
        return tuple(real for _, real in self._dirs)

    def __bool__(self) -> bool:
        return bool(self._dirs)

    def _locate(self, path: Path) -> tuple[Path, tuple[str, ...]]:
        """(allowed directory, components below it); RamDirError if the path is not under one."""
        if not path.is_absolute() or ".." in path.parts:
            raise RamDirError(f"ram_file {path} must be an absolute path without '..'")
        for given, real in self._dirs:
            for base in (real, given):
                depth = len(base.parts)
                if len(path.parts) > depth and path.parts[:depth] == base.parts:
                    return real, path.parts[depth:]
        if not self._dirs:
            raise RamDirError(f"ram_file {path}: this host has no directory for VM RAM files "
                              "(give --vm-ram-dirs DIR, or put the file in --ram-dir)")
        allowed = ", ".join(str(d) for d in self.dirs)
        raise RamDirError(f"ram_file {path} is not under a directory this host uses for VM RAM "
                          f"({allowed}; --vm-ram-dirs adds one)")

    def _walk(self, path: Path, missing_ok: bool) -> tuple[int, str, int] | None:
        """Open every directory from the allowed one down to the file's parent, O_NOFOLLOW.

        Returns (parent directory fd, file name, owner uid of the allowed directory), or
        None when a directory on the way does not exist and ``missing_ok``."""
        root, parts = self._locate(path)
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            if missing_ok and error.errno == errno.ENOENT:
                return None
            raise RamDirError(f"cannot open the VM RAM directory {root}: {error.strerror}") from None
        owner = os.fstat(fd).st_uid
        where = root
        try:
            for name in parts[:-1]:
                where = where / name
                try:
                    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise RamDirError(f"ram_file {path}: {where} is a symlink or not a directory; "
                                          "the path to a RAM file may not pass through a symlink") from None
                    if missing_ok and error.errno == errno.ENOENT:
                        os.close(fd)
                        return None
                    raise RamDirError(f"ram_file {path}: cannot open {where}: {error.strerror}") from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1], owner

    @staticmethod
    def _check_file(path: Path, info: os.stat_result, owner: int) -> None:
        if stat.S_ISLNK(info.st_mode):
            raise RamDirError(f"ram_file {path} is a symlink; refusing it")
        if not stat.S_ISREG(info.st_mode):
            raise RamDirError(f"ram_file {path} is not a regular file")
        if info.st_nlink != 1:
            raise RamDirError(f"ram_file {path} has {info.st_nlink} links; a RAM file must have exactly one "
                              "(a hard link could make the host punch a file elsewhere)")
        allowed = {os.geteuid(), owner}
        if info.st_uid not in allowed:
            raise RamDirError(f"ram_file {path} is owned by uid {info.st_uid}; the host punches only files of "
                              f"uid {' or '.join(map(str, sorted(allowed)))} (its own user, or the owner of the "
                              "VM RAM directory)")

    def check(self, path: Path | str) -> None:
        """Refuse a ram_file the host could never punch (admin API, ``--guests``), touching nothing.

        The file need not exist yet (the VMM creates it when the VM starts); whatever of
        the path exists must already pass, and everything is checked again at open."""
        path = Path(path)
        walked = self._walk(path, missing_ok=True)
        if walked is None:
            return
        dir_fd, name, owner = walked
        try:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            self._check_file(path, info, owner)
        finally:
            os.close(dir_fd)

    def open(self, path: Path | str, flags: int) -> int:
        """A descriptor of the ram_file for punching, after every check (RamDirError if any fails)."""
        path = Path(path)
        dir_fd, name, owner = self._walk(path, missing_ok=False)
        try:
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise RamDirError(f"ram_file {path} is a symlink; refusing it") from None
                raise RamDirError(f"cannot open ram_file {path}: {error.strerror or error}") from None
        finally:
            os.close(dir_fd)
        try:
            self._check_file(path, os.fstat(fd), owner)
        except BaseException:
            os.close(fd)
            raise
        return fd


def ram_file_name(guest: str) -> str:
    if not valid_guest_id(guest):
        raise RamDirError(f"not a valid guest id for a RAM file: {guest!r:.80}")
    return guest + SUFFIX


def _byte_ranges(pfns, counts, size: int, layout=None) -> tuple[np.ndarray, np.ndarray]:
    """Merged byte (offset, length) ranges of the file, clipped to it (tracker-validated anyway).

    ``layout`` (host_daemon/ramlayout.py) maps guest pages to file pages first: a VM's RAM
    above QEMU's PCI hole is stored below 4 GiB in the file. None or flat: the identity."""
    if layout is not None and not layout.flat:
        pfns, counts = layout.translate(np.asarray(pfns, dtype=np.uint64), np.asarray(counts, dtype=np.uint64))
    pfns, counts = sort_and_coalesce(pfns, counts)
    if not pfns.size:
        return pfns, counts
    pages = size // PAGE_SIZE
    inside = pfns < pages
    pfns, counts = pfns[inside], counts[inside]
    counts = np.minimum(counts, np.uint64(pages) - pfns)
    return pfns * np.uint64(PAGE_SIZE), counts * np.uint64(PAGE_SIZE)


def punch_holes(fd: int, offsets: np.ndarray, lengths: np.ndarray) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) each byte range (one syscall per merged range)."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
        if _fallocate(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"fallocate(PUNCH_HOLE) failed: {os.strerror(code)}")


def data_bytes(fd: int, offsets: np.ndarray, lengths: np.ndarray) -> int:
    """Bytes of the ranges that hold data (not holes), by SEEK_DATA/SEEK_HOLE (lseek(2))."""
    total = 0
    for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
        end = offset + length
        position = offset
        while position < end:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # no data after position
                    break
                raise
            if start >= end:
                break
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            total += stop - start
            position = stop
    return total


def madvise_remove(mapping: mmap.mmap, offsets: np.ndarray, lengths: np.ndarray) -> None:
    """madvise(MADV_REMOVE) each byte range of a MAP_SHARED mapping (the raw baseline)."""
    advise = mapping.madvise
    for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
        advise(mmap.MADV_REMOVE, offset, length)


class RamFile:
    """One guest's sparse RAM file, held open by the host for hole punching.

    ``owned``: the host created it (open mode, ``--ram-dir``) and removes it when it
    forgets the guest; a provisioned file (the inventory's ``ram_file``, e.g. QEMU's
    mem-path) is the VM's and is never created, resized or removed by the host.
    """

    def __init__(self, directory: Path, name: str, fd: int, size: int, owned: bool = True) -> None:
        self.directory = directory
        self.name = name
        self.fd = fd
        self.size = size
        # proof of reclaim (module doc), cumulative for this file
        self.requested_bytes = 0
        self.released_bytes = 0
        self.unreleased_bytes = 0
        self.ineffective_discards = 0
        self._warned_at = -WARN_EVERY_S
        self.owned = owned
        #: guest page -> file page map (ramlayout.RamLayout); None: the identity
        self.layout = None

    @property
    def path(self) -> Path:
        return self.directory / self.name

    @classmethod
    def open(cls, ram_dir: Path | str, guest: str, pages: int) -> RamFile:
        """Create ``ram_dir/<guest>.ram`` sparse, or reopen it — never shrinking it.

        The file outlives host restarts and sessions: a guest's memory is its own until
        the host forgets the guest (``remove``). Someone may map it at any time (the
        guest of an earlier session, across a host restart), and truncating a mapped
        file makes that process die of SIGBUS on its next access — so a smaller claim
        keeps the file as it is, and a larger one only extends it (pages past the old
        end read as zeros, as fresh RAM does). The caller bounds ``pages``
        (``--max-guest-memory``); this only refuses what no file could hold.
        """
        name = ram_file_name(guest)
        if not 0 < pages <= (1 << 52):
            raise RamDirError(f"cannot size a RAM file for {pages} pages")
        size = pages * PAGE_SIZE
        directory = Path(ram_dir)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (NotADirectoryError, FileNotFoundError) as error:
            raise RamDirError(
                f"{directory} is not a real directory (symlinks are refused)"
            ) from error
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            try:
                fd = os.open(name, flags, 0o660, dir_fd=dir_fd)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise RamDirError(f"{directory / name} is a symlink; refusing it") from error
                raise
        finally:
            os.close(dir_fd)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RamDirError(f"{directory / name} is not a regular file")
            if info.st_nlink != 1:
                raise RamDirError(f"{directory / name} has {info.st_nlink} links; refusing it")
            if info.st_size < size:
                os.ftruncate(fd, size)  # grow only: existing pages and mappings stay valid
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, name, fd, size)

    @classmethod
    def open_provisioned(cls, path: Path | str, pages: int, dirs: VmRamDirs) -> RamFile:
        """Open a provisioned guest's own RAM file for punching: never create or resize it.

        The VMM made it (QEMU ``memory-backend-file,mem-path=...,share=on``) and maps it;
        the host only punches holes in the first ``pages`` pages. ``dirs`` decides whether
        the host may touch it at all (under a VM RAM directory, no symlink on the way, a
        regular file with one link, owned as configured) — checked again at every open,
        on the descriptor that is then punched, so nothing can be swapped in between.
        """
        path = Path(path)
        fd = dirs.open(path, os.O_RDWR | os.O_NONBLOCK)
        try:
            size = pages * PAGE_SIZE
            have = os.fstat(fd).st_size
            if have < size:
                raise RamDirError(f"ram_file {path} holds {have} bytes, less than the "
                                  f"guest's provisioned {size}; is it this guest's RAM?")
        except BaseException:
            os.close(fd)
            raise
        return cls(path.parent, path.name, fd, size, owned=False)

    def discard(self, pfns, counts) -> int:
        """Give the pages back to the kernel; returns the bytes it actually freed."""
        offsets, lengths = _byte_ranges(pfns, counts, self.size, self.layout)
        if not offsets.size:
            return 0
        requested = int(lengths.sum())
        before = self.allocated_bytes()
        punch_holes(self.fd, offsets, lengths)
        released = max(0, before - self.allocated_bytes())
        self.requested_bytes += requested
        self.released_bytes += released
        if released < requested:
            left = data_bytes(self.fd, offsets, lengths)
            if left:
                self.unreleased_bytes += left
                self.ineffective_discards += 1
                now = time.monotonic()
                if now - self._warned_at >= WARN_EVERY_S:
                    self._warned_at = now
                    log.warning("discard released less than it should: data still in the punched ranges",
                                extra={"file": self.name, "requested_bytes": requested, "released_bytes": released,
                                       "unreleased_bytes": left, "ineffective_total": self.ineffective_discards})
        return released

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def resident_bytes(self) -> int:
        """Bytes of guest RAM backed by host memory now (tmpfs: the allocated blocks)."""
        return self.allocated_bytes()

    def reclaimed_bytes(self) -> int:
        return max(0, self.size - self.allocated_bytes())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Delete the file (the host forgot the guest), if it is still the one we opened.

        A provisioned file is only closed: it is the VM's, not the host's."""
        if not self.owned:
            self.close()
            return
        ours = os.fstat(self.fd) if self.fd >= 0 else None
        self.close()
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                current = os.stat(self.name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if ours is None or (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino):
                os.unlink(self.name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def __enter__(self) -> RamFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


def remove_ram_file(ram_dir: Path | str, guest: str) -> bool:
    """Delete a guest's RAM file without a RamFile open (retention expired after a restart)."""
    name = ram_file_name(guest)
    dir_fd = os.open(Path(ram_dir), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(current.st_mode):
            return False
        os.unlink(name, dir_fd=dir_fd)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(dir_fd)


def ram_files(ram_dir: Path | str) -> list[str]:
    """Guest ids that have a RAM file in the directory (for forgetting them after a restart)."""
    found = []
    for entry in os.scandir(ram_dir):
        if entry.name.endswith(SUFFIX) and entry.is_file(follow_symlinks=False):
            guest = entry.name[: -len(SUFFIX)]
            if valid_guest_id(guest):
                found.append(guest)
    return sorted(found)
