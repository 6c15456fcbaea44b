"""Host memory inputs of the policy: /proc/meminfo + PSI, a cgroup v2, or a guest-memory budget.

- ``meminfo``: ``MemAvailable`` of ``MemTotal`` (the kernel's estimate of what can be
  allocated without swapping, mm/page_alloc.c si_mem_available), pressure from
  ``/proc/pressure/memory`` (PSI, Documentation/accounting/psi.rst: ``some``/``full``
  ``avg10``, percent of the last 10 s with tasks stalled on memory).
- ``cgroup:DIR``: ``memory.max - memory.current`` of ``memory.max`` (``max`` means no
  limit: MemTotal stands in), pressure from ``DIR/memory.pressure`` (same format).
- ``budget``: ``--guest-memory-budget SIZE``; available = budget minus the guests'
  resident bytes, read from their RAM files' ``st_blocks`` — what the kernel really holds
  for them, never what the balloons claim. This is what tests and the demo use: a test
  cannot safely starve the machine it runs on.

Parsing is pure (text in, numbers out); ``read`` does the I/O, on the event loop
(a few small procfs reads per policy interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .policy.model import HostMemory

SOURCES = ("meminfo", "cgroup", "budget")


class HostMemoryError(ValueError):
    """A host memory source is unusable; the message says which file and why."""


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` → {field: bytes} (the kernel writes kB = KiB)."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return values


def parse_psi(text: str) -> tuple[float, float]:
    """A PSI file (``some avg10=1.50 ...`` / ``full avg10=0.20 ...``) → (some, full) avg10 as ratios."""
    found = {"some": 0.0, "full": 0.0}
    for line in text.splitlines():
        kind, *fields = line.split()
        if kind in found:
            for item in fields:
                key, _, value = item.partition("=")
                if key == "avg10":
                    try:
                        found[kind] = min(1.0, max(0.0, float(value) / 100.0))
                    except ValueError:
                        raise HostMemoryError(f"PSI line has a bad avg10: {line!r:.80}") from None
    return found["some"], found["full"]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise HostMemoryError(f"cannot read {path}: {error.strerror or error}") from None


def _psi(path: Path) -> tuple[float, float]:
    try:
        return parse_psi(path.read_text())
    except OSError:  # PSI is optional (CONFIG_PSI, psi=0): no pressure signal, not an error
        return 0.0, 0.0


@dataclass(frozen=True, slots=True)
class HostMemorySource:
    """Where the host's memory state comes from; ``read(resident)`` measures it now."""

    kind: str
    budget: int | None = None
    cgroup: Path | None = None
    proc: Path = Path("/proc")

    def read(self, guests_resident: int) -> HostMemory:
        some, full = _psi(self.cgroup / "memory.pressure" if self.cgroup else self.proc / "pressure" / "memory")
        if self.kind == "budget":
            return HostMemory(self.budget, self.budget - guests_resident, some, full, "budget")
        meminfo = parse_meminfo(_read(self.proc / "meminfo"))
        total = meminfo.get("MemTotal")
        if not total:
            raise HostMemoryError(f"{self.proc / 'meminfo'} has no MemTotal")
        if self.kind == "meminfo":
            available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
            return HostMemory(total, available, some, full, "meminfo")
        current = int(_read(self.cgroup / "memory.current").strip() or 0)
        limit_text = _read(self.cgroup / "memory.max").strip()
        limit = min(total, int(limit_text)) if limit_text != "max" else total
        return HostMemory(limit, limit - current, some, full, "cgroup")

    def describe(self) -> str:
        if self.kind == "budget":
            return f"budget {self.budget} bytes"
        return f"cgroup {self.cgroup}" if self.kind == "cgroup" else "meminfo"


def make_source(spec: str | None, budget: int | None, proc: Path = Path("/proc")) -> HostMemorySource:
    """``--host-memory`` + ``--guest-memory-budget`` → a source (HostMemoryError for bad ones).

    A budget alone means the budget source; no spec and no budget means meminfo.
    """
    if spec is None or spec == "":
        spec = "budget" if budget is not None else "meminfo"
    if spec == "budget":
        if budget is None or budget <= 0:
            raise HostMemoryError("--host-memory budget needs --guest-memory-budget SIZE (above 0)")
        return HostMemorySource("budget", budget=budget, proc=proc)
    if spec == "meminfo":
        return HostMemorySource("meminfo", proc=proc)
    if spec.startswith("cgroup:"):
        path = Path(spec[len("cgroup:"):])
        if not path.is_absolute() or not (path / "memory.current").is_file():
            raise HostMemoryError(f"--host-memory {spec}: not a cgroup v2 directory with memory.current")
        return HostMemorySource("cgroup", cgroup=path, proc=proc)
    raise HostMemoryError(f"--host-memory must be meminfo, cgroup:/sys/fs/cgroup/DIR or budget, got {spec!r}")
