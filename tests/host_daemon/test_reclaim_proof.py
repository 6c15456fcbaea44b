"""Proof of reclaim: what a discard asked for, what the kernel released, and a discard that lied."""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from host_daemon import reclaim
from host_daemon.reclaim import PAGE_SIZE, RamFile

SHM = Path("/dev/shm")


@pytest.fixture
def ram(tmp_path_factory):
    if not SHM.is_dir():
        pytest.skip("no /dev/shm tmpfs")
    base = Path(os.path.realpath(SHM)) / f"balloon-proof-{os.getpid()}-{tmp_path_factory.getbasetemp().name}"
    base.mkdir()
    ram = RamFile.open(base, "g1", 256)
    yield ram
    ram.remove()
    base.rmdir()


def touch(ram: RamFile, first: int, count: int) -> None:
    with mmap.mmap(ram.fd, ram.size, mmap.MAP_SHARED) as mapping:
        view = np.frombuffer(mapping, dtype=np.uint8)
        view[first * PAGE_SIZE:(first + count) * PAGE_SIZE:PAGE_SIZE] = 1
        del view


def ranges(*pairs):
    return (np.array([p for p, _ in pairs], dtype=np.uint64), np.array([c for _, c in pairs], dtype=np.uint64))


def test_released_is_what_the_kernel_gave_back(ram):
    touch(ram, 0, 64)
    released = ram.discard(*ranges((0, 32), (128, 32)))  # half touched, half never touched
    assert released == 32 * PAGE_SIZE
    assert (ram.requested_bytes, ram.released_bytes) == (64 * PAGE_SIZE, 32 * PAGE_SIZE)
    # holes released nothing and needed nothing: not a failed discard
    assert (ram.unreleased_bytes, ram.ineffective_discards) == (0, 0)


def test_a_discard_that_frees_nothing_is_counted_and_logged(ram, monkeypatch, caplog):
    """MADV_DONTNEED on a shared mapping 'succeeds' and the file keeps every page (Firecracker's trap)."""
    touch(ram, 0, 64)

    def dontneed(fd, offsets, lengths):
        with mmap.mmap(fd, ram.size, mmap.MAP_SHARED) as mapping:
            for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
                mapping.madvise(mmap.MADV_DONTNEED, offset, length)

    monkeypatch.setattr(reclaim, "punch_holes", dontneed)
    with caplog.at_level(logging.WARNING, logger="balloon.host.reclaim"):
        released = ram.discard(*ranges((0, 48)))
    assert released == 0
    assert (ram.requested_bytes, ram.released_bytes) == (48 * PAGE_SIZE, 0)
    assert (ram.unreleased_bytes, ram.ineffective_discards) == (48 * PAGE_SIZE, 1)
    assert any("released less" in record.getMessage() for record in caplog.records)


def test_data_bytes_counts_only_data(ram):
    touch(ram, 10, 5)
    touch(ram, 100, 1)
    offsets = np.array([0, 99 * PAGE_SIZE], dtype=np.uint64)
    lengths = np.array([12 * PAGE_SIZE, 10 * PAGE_SIZE], dtype=np.uint64)
    assert reclaim.data_bytes(ram.fd, offsets, lengths) == 3 * PAGE_SIZE  # pages 10, 11 and 100
