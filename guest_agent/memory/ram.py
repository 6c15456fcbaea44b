"""The guest's RAM as the host's shared file, and the canaries that prove no data is lost.

With ``--ram-dir`` the host creates ``DIR/<guest>.ram`` (sparse, pages x 4096 bytes) and
names it in WELCOME; the guest maps it ``MAP_SHARED`` so the host's hole punching
(``madvise(MADV_REMOVE)`` / ``fallocate(PUNCH_HOLE)``) on reported and inflated ranges
really drops the guest's pages — and would drop live data too if the host ever
discarded a page the guest still uses (docs/OPERATIONS.md, BalloonCanaryFailures).

A canary is 16 bytes at the start of a page: word 0 = the PFN, word 1 = the generation
XOR :data:`CANARY_TAG` (little-endian uint64s). The tag makes a zero page — what a
punched hole reads back as — fail for every PFN and generation, including PFN 0.
Writes and checks go through a numpy ``(pages, 512)`` uint64 view of the mapping:
one scatter per call, no Python loop per page. Only the first cache line of each page
is touched, so a check does not fault in more than it reads.

Pages the guest reported or ballooned are uninitialized (they read back as zeros after
reclaim); callers write a fresh canary when such a page is allocated again.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from shared.ranges import expand_pages
from shared.vocabulary import PAGE_SIZE

WORDS_PER_PAGE = PAGE_SIZE // 8
CANARY_TAG = 0xCA11_AB1E_5EED_0001
#: Up to this many ranges per call are written with slices instead of a gather/scatter.
_SLICE_RANGES = 8


def _ranges(pfns, counts, pages: int) -> tuple[np.ndarray, np.ndarray]:
    pfns = np.asarray(pfns, dtype=np.uint64).reshape(-1)
    counts = np.asarray(counts, dtype=np.uint64).reshape(-1)
    if pfns.shape != counts.shape:
        raise ValueError(f"{pfns.size} pfns but {counts.size} counts")
    if pfns.size and (
        int(counts.min()) == 0 or int((pfns + counts).max()) > pages or int(pfns.max()) >= pages
    ):
        raise ValueError(f"a range is empty or runs past guest RAM ({pages} pages)")
    return pfns, counts


class SharedRam:
    """Guest RAM mapped from a file (or anonymous memory), with vectorized canaries."""

    def __init__(self, path: str | os.PathLike | None, pages: int):
        pages = int(pages)
        if pages < 1:
            raise ValueError(f"pages must be >= 1, got {pages}")
        self.pages = pages
        self.size = pages * PAGE_SIZE
        self.path = None if path is None else Path(path)
        if self.path is None:
            self._map = mmap.mmap(-1, self.size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        else:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            try:
                actual = os.fstat(fd).st_size
                if actual < self.size:  # touching past the end would be SIGBUS
                    raise ValueError(
                        f"{self.path} holds {actual} bytes, guest RAM needs {self.size}"
                    )
                self._map = mmap.mmap(
                    fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            finally:
                os.close(fd)  # the mapping keeps the file
        self._words = np.frombuffer(self._map, dtype="<u8").reshape(pages, WORDS_PER_PAGE)
        self._flat = self._words.reshape(-1)  # word i of page p is _flat[p * 512 + i]

    @classmethod
    def anonymous(cls, pages: int) -> SharedRam:
        """In-process RAM for runs without a host RAM file (nothing reclaims it)."""
        return cls(None, pages)

    @property
    def shared(self) -> bool:
        return self.path is not None

    # ----------------------------------------------------------------- canaries
    @staticmethod
    def _expected_tag(generation) -> np.ndarray:
        return np.asarray(generation, dtype=np.uint64) ^ np.uint64(CANARY_TAG)

    def write_canaries(self, pfns, counts, generation) -> int:
        """Write the canary of every page in the ranges; returns pages written.

        ``generation`` is one value for all pages or one per page (in range order)."""
        pfns, counts = _ranges(pfns, counts, self.pages)
        words = self._words
        tag = self._expected_tag(generation)
        if pfns.size <= _SLICE_RANGES and tag.ndim == 0:
            for p, c in zip(pfns.tolist(), counts.tolist(), strict=True):
                words[p : p + c, 0] = np.arange(p, p + c, dtype=np.uint64)
                words[p : p + c, 1] = tag
            return int(counts.sum())
        pages = expand_pages(pfns, counts).astype(np.intp)
        if tag.ndim and tag.shape != pages.shape:
            raise ValueError(f"{tag.size} generations for {pages.size} pages")
        first = pages * WORDS_PER_PAGE
        self._flat[first] = pages
        self._flat[first + 1] = tag
        return int(pages.size)

    def check_canaries(self, pfns, counts, generation) -> int:
        """Number of pages in the ranges whose canary is not (PFN, generation)."""
        pfns, counts = _ranges(pfns, counts, self.pages)
        tag = self._expected_tag(generation)
        if pfns.size == 1 and tag.ndim == 0:
            p, c = int(pfns[0]), int(counts[0])
            head = self._words[p : p + c, :2]
            bad = (head[:, 0] != np.arange(p, p + c, dtype=np.uint64)) | (head[:, 1] != tag)
            return int(np.count_nonzero(bad))
        pages = expand_pages(pfns, counts).astype(np.intp)
        return self.check_pages(pages, generation)

    def check_pages(self, pages, generation) -> int:
        """Like ``check_canaries`` for an array of PFNs (e.g. a sample)."""
        pages = np.asarray(pages, dtype=np.intp)
        if pages.size and (pages.min() < 0 or pages.max() >= self.pages):
            raise ValueError("a page is outside guest RAM")
        tag = self._expected_tag(generation)
        if tag.ndim and tag.shape != pages.shape:
            raise ValueError(f"{tag.size} generations for {pages.size} pages")
        first = pages * WORDS_PER_PAGE
        bad = (self._flat[first] != pages.astype(np.uint64)) | (self._flat[first + 1] != tag)
        return int(np.count_nonzero(bad))

    def sample_check(
        self, pfns, counts, generation, samples: int, rng: np.random.Generator
    ) -> tuple[int, int]:
        """Check ``samples`` pages drawn uniformly from the ranges (a sweep while running).

        ``generation`` must be a single value here. Returns ``(pages checked, failures)``."""
        pfns, counts = _ranges(pfns, counts, self.pages)
        total = int(counts.sum()) if counts.size else 0
        if total == 0 or samples <= 0:
            return 0, 0
        n = min(int(samples), total)
        # the k-th page of the concatenated ranges, without expanding them all
        offsets = np.sort(rng.choice(total, size=n, replace=False)).astype(np.uint64)
        ends = np.cumsum(counts)
        which = np.searchsorted(ends, offsets, side="right")
        pages = pfns[which] + offsets - (ends[which] - counts[which])
        return n, self.check_pages(pages.astype(np.intp), generation)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self._map.closed:
            return
        del self._words, self._flat  # release the buffer export before unmapping
        self._map.close()

    def __enter__(self) -> SharedRam:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
