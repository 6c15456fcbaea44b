"""RamFile on a real tmpfs: holes read back as zeros, other pages keep their data."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from host_daemon.reclaim import (
    PAGE_SIZE,
    RamDirError,
    RamFile,
    VmRamDirs,
    madvise_remove,
    ram_files,
    remove_ram_file,
    validate_ram_dir,
)

SHM = Path("/dev/shm")


@pytest.fixture
def ram_dir(tmp_path_factory):
    if not SHM.is_dir():
        pytest.skip("no /dev/shm tmpfs")
    base = SHM / f"balloon-test-{os.getpid()}-{tmp_path_factory.getbasetemp().name}"
    base.mkdir(exist_ok=True)
    directory = Path(os.path.realpath(base)) / "ram"
    directory.mkdir()
    yield directory
    for entry in directory.iterdir():
        entry.unlink()
    directory.rmdir()
    base.rmdir()


def fill(ram: RamFile, pages: int) -> mmap.mmap:
    """Write each page's number into its first 8 bytes, as a guest owning every page would."""
    mapping = mmap.mmap(ram.fd, pages * PAGE_SIZE, mmap.MAP_SHARED)
    view = np.frombuffer(mapping, dtype=np.uint64).reshape(pages, PAGE_SIZE // 8)
    view[:, 0] = np.arange(pages, dtype=np.uint64) + 1
    del view
    return mapping


def first_words(mapping: mmap.mmap, pages: int) -> np.ndarray:
    view = np.frombuffer(mapping, dtype=np.uint64).reshape(pages, PAGE_SIZE // 8)
    words = view[:, 0].copy()
    del view
    return words


def test_discard_zeroes_exactly_the_ranges(ram_dir):
    pages = 1024
    ram = RamFile.open(ram_dir, "g1", pages)
    assert ram.path == ram_dir / "g1.ram"
    assert ram.allocated_bytes() == 0 and ram.reclaimed_bytes() == pages * PAGE_SIZE
    mapping = fill(ram, pages)
    assert ram.allocated_bytes() == pages * PAGE_SIZE
    assert ram.reclaimed_bytes() == 0
    # Unsorted, overlapping and adjacent ranges: merged before punching.
    pfns = np.array([100, 10, 12, 500, 14, 1023], dtype=np.uint64)
    counts = np.array([50, 3, 2, 12, 1, 1], dtype=np.uint64)
    freed = ram.discard(pfns, counts)
    gone = np.zeros(pages, dtype=bool)
    for pfn, count in zip(pfns.tolist(), counts.tolist(), strict=True):
        gone[pfn : pfn + count] = True
    assert freed == int(gone.sum()) * PAGE_SIZE
    assert ram.allocated_bytes() == (pages - int(gone.sum())) * PAGE_SIZE
    assert ram.resident_bytes() == ram.allocated_bytes()
    assert ram.reclaimed_bytes() == int(gone.sum()) * PAGE_SIZE
    words = first_words(mapping, pages)
    expected = np.where(gone, 0, np.arange(pages, dtype=np.uint64) + 1)
    assert np.array_equal(words, expected)
    # Reading a hole through a MAP_SHARED tmpfs mapping allocates a zero page again
    # (shmem has no shared zero page): the read-back above re-populated the holes.
    assert ram.discard(pfns, counts) == freed
    assert ram.discard(pfns, counts) == 0  # holes stay holes
    mapping.close()
    ram.close()


def test_reopen_keeps_data_and_a_new_claim_never_shrinks_or_wipes_the_file(ram_dir):
    """Issue 9 items 2 and 5: whoever claims the id next must not truncate a file someone maps."""
    ram = RamFile.open(ram_dir, "g2", 64)
    mapping = fill(ram, 64)
    ram.close()
    again = RamFile.open(ram_dir, "g2", 64)  # host restart: the guest's memory survives
    assert np.array_equal(first_words(mapping, 64), np.arange(64, dtype=np.uint64) + 1)
    again.close()
    smaller = RamFile.open(ram_dir, "g2", 1)  # the old code truncated here: the mapper got SIGBUS
    assert smaller.size == PAGE_SIZE and os.path.getsize(smaller.path) == 64 * PAGE_SIZE
    assert np.array_equal(first_words(mapping, 64), np.arange(64, dtype=np.uint64) + 1)
    smaller.close()
    larger = RamFile.open(ram_dir, "g2", 128)  # grows; the first 64 pages keep their data
    assert larger.size == 128 * PAGE_SIZE == os.path.getsize(larger.path)
    assert np.array_equal(first_words(mapping, 64), np.arange(64, dtype=np.uint64) + 1)
    mapping.close()
    larger.remove()
    assert not (ram_dir / "g2.ram").exists()


def test_a_provisioned_file_is_opened_never_created_resized_or_removed(ram_dir, tmp_path):
    path = ram_dir / "vm1.ram"
    with pytest.raises(RamDirError, match="cannot open"):
        RamFile.open_provisioned(path, 16, VmRamDirs([ram_dir]))
    assert not path.exists()
    with open(path, "wb") as handle:
        handle.truncate(8 * PAGE_SIZE)
    with pytest.raises(RamDirError, match="less than"):
        RamFile.open_provisioned(path, 16, VmRamDirs([ram_dir]))
    assert os.path.getsize(path) == 8 * PAGE_SIZE
    ram = RamFile.open_provisioned(path, 4, VmRamDirs([ram_dir]))  # bigger than provisioned is fine: only 4 pages are punched
    mapping = fill(ram, 8)
    ram.discard(np.array([0], dtype=np.uint64), np.array([100], dtype=np.uint64))
    words = first_words(mapping, 8)
    assert list(words[:4]) == [0] * 4 and list(words[4:]) == [5, 6, 7, 8]
    mapping.close()
    ram.remove()  # the VM's file: closed, not deleted
    assert os.path.getsize(path) == 8 * PAGE_SIZE
    link = ram_dir / "vm2.ram"
    link.symlink_to(path)
    with pytest.raises(RamDirError, match="symlink"):
        RamFile.open_provisioned(link, 4, VmRamDirs([ram_dir]))
    link.unlink()
    fifo = ram_dir / "vm3.ram"
    os.mkfifo(fifo)
    with pytest.raises(RamDirError, match="regular"):
        RamFile.open_provisioned(fifo, 4, VmRamDirs([ram_dir]))
    fifo.unlink()


def test_discard_ignores_ranges_past_the_file(ram_dir):
    ram = RamFile.open(ram_dir, "g3", 16)
    fill(ram, 16).close()
    freed = ram.discard(np.array([14, 100], dtype=np.uint64), np.array([10, 5], dtype=np.uint64))
    assert freed == 2 * PAGE_SIZE
    assert os.path.getsize(ram.path) == 16 * PAGE_SIZE
    assert ram.discard(np.empty(0, np.uint64), np.empty(0, np.uint64)) == 0
    ram.close()


@pytest.mark.parametrize("guest", ["../etc", "a/b", "", ".hidden", "x" * 64, "a\x00b", "..", 5])
def test_invalid_guest_ids_are_refused(ram_dir, guest):
    with pytest.raises(RamDirError):
        RamFile.open(ram_dir, guest, 16)
    assert list(ram_dir.iterdir()) == []


def test_symlinks_and_hard_links_are_refused(ram_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (ram_dir / "evil.ram").symlink_to(victim)
    with pytest.raises(RamDirError):
        RamFile.open(ram_dir, "evil", 16)
    outside = ram_dir.parent / "outside"
    outside.write_bytes(b"precious")
    try:
        os.link(outside, ram_dir / "linked.ram")
        with pytest.raises(RamDirError):
            RamFile.open(ram_dir, "linked", 16)
        assert outside.read_bytes() == b"precious"
    finally:
        (ram_dir / "linked.ram").unlink(missing_ok=True)
        outside.unlink()
    os.mkfifo(ram_dir / "fifo.ram")
    with pytest.raises(RamDirError):
        RamFile.open(ram_dir, "fifo", 16)
    assert victim.read_bytes() == b"precious"
    assert ram_files(ram_dir) == []  # neither a symlink nor a fifo counts as a RAM file
    (ram_dir / "evil.ram").unlink()
    (ram_dir / "fifo.ram").unlink()


def test_ram_dir_validation(ram_dir, tmp_path):
    assert validate_ram_dir(ram_dir) == ram_dir
    with pytest.raises(RamDirError):
        validate_ram_dir(tmp_path / "missing")
    link = tmp_path / "link"
    link.symlink_to(ram_dir)
    with pytest.raises(RamDirError):
        validate_ram_dir(link)
    with pytest.raises(RamDirError):
        RamFile.open(link, "g", 16)  # the directory itself is opened with O_NOFOLLOW


def test_listing_and_removing_left_over_files(ram_dir):
    for guest in ("b", "a"):
        RamFile.open(ram_dir, guest, 8).close()
    (ram_dir / "notes.txt").write_text("not a guest")
    assert ram_files(ram_dir) == ["a", "b"]
    assert remove_ram_file(ram_dir, "a") is True
    assert remove_ram_file(ram_dir, "a") is False
    assert ram_files(ram_dir) == ["b"]
    remove_ram_file(ram_dir, "b")
    (ram_dir / "notes.txt").unlink()


def test_remove_leaves_a_replaced_file_alone(ram_dir):
    ram = RamFile.open(ram_dir, "g4", 8)
    os.unlink(ram.path)
    replacement = RamFile.open(ram_dir, "g4", 8)
    ram.remove()  # the old session's file is gone; the new one must stay
    assert replacement.path.exists()
    replacement.remove()


def test_madvise_remove_baseline(ram_dir):
    ram = RamFile.open(ram_dir, "g5", 256)
    mapping = fill(ram, 256)
    offsets = np.array([0, 128 * PAGE_SIZE], dtype=np.uint64)
    lengths = np.array([64 * PAGE_SIZE, 128 * PAGE_SIZE], dtype=np.uint64)
    madvise_remove(mapping, offsets, lengths)
    assert ram.allocated_bytes() == 64 * PAGE_SIZE
    words = first_words(mapping, 256)
    assert not words[:64].any() and not words[128:].any()
    assert np.array_equal(words[64:128], np.arange(64, 128, dtype=np.uint64) + 1)
    mapping.close()
    ram.close()
