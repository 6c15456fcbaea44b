"""Host memory inputs: meminfo + PSI, a cgroup v2 directory, a guest-memory budget."""

from __future__ import annotations

import pytest

from host_daemon.hostmem import HostMemoryError, make_source, parse_meminfo, parse_psi

MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    4000000 kB\nHugePages_Total:       0\n"
PSI = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=2.00 avg60=0.50 avg300=0.10 total=45\n"


def test_parse_meminfo_in_bytes():
    values = parse_meminfo(MEMINFO)
    assert values["MemTotal"] == 16_000_000 * 1024 and values["MemAvailable"] == 4_000_000 * 1024
    assert values["HugePages_Total"] == 0


def test_parse_psi_avg10_as_ratios():
    assert parse_psi(PSI) == (0.125, 0.02)
    assert parse_psi("") == (0.0, 0.0)
    with pytest.raises(HostMemoryError):
        parse_psi("some avg10=lots\n")


@pytest.fixture
def proc(tmp_path):
    (tmp_path / "pressure").mkdir()
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "pressure" / "memory").write_text(PSI)
    return tmp_path


def test_meminfo_source(proc):
    state = make_source("meminfo", None, proc).read(guests_resident=123)
    assert (state.total_bytes, state.available_bytes, state.source) == (16_000_000 * 1024, 4_000_000 * 1024, "meminfo")
    assert (state.pressure_some, state.pressure_full) == (0.125, 0.02)


def test_budget_counts_resident_bytes_and_may_go_negative(proc):
    source = make_source(None, 1000, proc)
    assert source.kind == "budget"
    assert source.read(400).available_bytes == 600
    assert source.read(1500).available_bytes == -500
    with pytest.raises(HostMemoryError, match="guest-memory-budget"):
        make_source("budget", None, proc)


def test_psi_missing_is_no_pressure_not_an_error(proc):
    (proc / "pressure" / "memory").unlink()
    state = make_source("meminfo", None, proc).read(0)
    assert (state.pressure_some, state.pressure_full) == (0.0, 0.0)


def test_cgroup_source(proc, tmp_path):
    group = tmp_path / "machine.slice"
    group.mkdir()
    (group / "memory.current").write_text("3000\n")
    (group / "memory.max").write_text("10000\n")
    (group / "memory.pressure").write_text("some avg10=50.00 avg60=0 avg300=0 total=1\n")
    state = make_source(f"cgroup:{group}", None, proc).read(0)
    assert (state.total_bytes, state.available_bytes, state.pressure_some) == (10000, 7000, 0.5)
    (group / "memory.max").write_text("max\n")  # no limit: the machine's RAM stands in
    assert make_source(f"cgroup:{group}", None, proc).read(0).total_bytes == 16_000_000 * 1024


@pytest.mark.parametrize("spec", ["cgroup:relative", "cgroup:/nonexistent-cgroup", "psi", "budget:5"])
def test_bad_sources_are_one_line_errors(spec, proc):
    with pytest.raises(HostMemoryError):
        make_source(spec, None, proc)
