"""What balloonctl prints: sizes and rates for people, tables that fit the terminal.

Columns use the same words as the /ui dashboard. A narrow terminal drops whole columns,
least important first (as htop, virt-top and k9s shed them): a guest id is never cut and a
number never ellipsized.
"""

from __future__ import annotations

import os
import shutil
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.runtime.config import format_size


def human_bytes(value: float | None) -> str:
    """Sizes as parse_size reads them back (256MiB, 1.5GiB): compact, so columns stay narrow."""
    return format_size(value)


def human_rate(value: float | None, unit: str = "/s") -> str:
    if value is None:
        return "-"
    for suffix, factor in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{suffix}{unit}"
    return f"{value:.1f}{unit}"


def human_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}µs"
    if value < 1:
        return f"{value * 1e3:.2f}ms"
    return f"{value:.2f}s"


def human_bound(value: float | None) -> str:
    """A histogram quantile, which is a bucket's upper edge: ``<=250µs``, ``<=2.5ms``, ``<=1s``
    (the true value is at most this; two decimals would claim a precision it does not have)."""
    if value is None:
        return "-"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= factor or unit == "µs":
            return f"<={value / factor:.3g}{unit}"
    return "-"


def human_duration(age: float | None) -> str:
    if age is None:
        return "-"
    age = max(0.0, age)
    if age < 60:
        return f"{age:.0f}s"
    if age < 3600:
        return f"{age / 60:.0f}m"
    return f"{age / 3600:.1f}h"


def human_age(timestamp: float | None, now: float) -> str:
    return "-" if timestamp is None else human_duration(now - timestamp) + " ago"


def free_bytes(guest: dict) -> int | None:
    """Free memory as the guest last said in STATS (virtio tag 4, MEMFREE)."""
    if isinstance(guest.get("unused_bytes"), int):
        return guest["unused_bytes"]
    value = (guest.get("stats") or {}).get("4")
    return int(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Column:
    """One column of status/top. Priority 0 is never dropped; the highest numbers go first
    when the terminal is too narrow (as htop, virt-top and k9s shed columns)."""

    name: str
    priority: int
    cell: Callable[[dict, dict | None], str | None]  # (GUEST, its rates or None in status)
    left: bool = False


def _target(guest: dict) -> str:
    target = guest.get("target_bytes")
    if target is None:
        return "-"
    return human_bytes(target) + ("!" if guest.get("target_state") == "unreachable" else "")


def _window(guest: dict) -> str:
    window = guest.get("window") or {}
    return f"{window.get('in_use', 0)}/{window.get('size', 0)}"


def _up(guest: dict) -> str:
    """up: an agent session; vmm: a stock guest whose QEMU answers (no agent); down otherwise."""
    if guest.get("connected"):
        return "up"
    vmm = guest.get("vmm") or {}
    return "vmm" if guest.get("driver") == "virtio-balloon" and vmm.get("state") == "connected" else "down"


def _vmm(guest: dict) -> str:
    """The VMM link: - (none), ok, held:<why discards are blocked>, down, error, ..."""
    vmm = guest.get("vmm")
    if not vmm:
        return "-"
    state = vmm.get("state")
    if state == "connected":
        blocked = vmm.get("discard_blocked")
        return f"held:{blocked}" if blocked else "ok"
    return {"unreachable": "down", "connecting": "..."}.get(state, str(state))


def _per_second(value: float | None) -> str:
    return "-" if value is None else human_bytes(value) + "/s"


def _top_only(cell):
    return lambda g, r: None if r is None else cell(g, r)


# With ids of up to ~12 characters, the columns of priority <= 3 fit 80 columns.
COLUMNS = (
    Column("guest", 0, lambda g, r: str(g.get("id")), left=True),
    Column("up", 1, lambda g, r: _up(g), left=True),
    Column("memory", 2, lambda g, r: human_bytes(g.get("memory_bytes"))),
    Column("actual", 1, lambda g, r: human_bytes(g.get("actual_bytes"))),
    Column("balloon", 1, lambda g, r: human_bytes(g.get("inflated_bytes"))),
    Column("target", 2, lambda g, r: _target(g)),
    Column("reported", 1, lambda g, r: human_bytes(g.get("reported_bytes"))),
    Column("usable", 3, lambda g, r: human_bytes(g.get("usable_bytes"))),
    Column("stats", 3, lambda g, r: human_duration(g.get("stats_age_seconds"))),
    Column("reclaimed", 5, lambda g, r: human_bytes(g.get("reclaimed_bytes"))),
    Column("vmm", 4, lambda g, r: _vmm(g), left=True),
    Column("driver", 6, lambda g, r: {"virtio-balloon": "virtio"}.get(g.get("driver"), g.get("driver") or "-"),
           left=True),
    Column("report/s", 4, _top_only(lambda g, r: _per_second(r.get("report_bytes_per_s")))),
    Column("inflate/s", 6, _top_only(lambda g, r: _per_second(r.get("inflate_bytes_per_s")))),
    Column("batches/s", 5, _top_only(lambda g, r: human_rate(r.get("batches_per_s"), ""))),
    Column("batches", 7, lambda g, r: None if r is not None else str(sum((g.get("batches") or {}).values()))),
    Column("window", 7, lambda g, r: _window(g)),
    Column("p99 5m", 6, lambda g, r: human_bound(g.get("apply_seconds_p99_recent"))),
    Column("rejected", 8, lambda g, r: str(sum((g.get("rejected_pages") or {}).values()))),
    Column("errors", 8, lambda g, r: str(g.get("errors", 0))),
    Column("last msg", 9, lambda g, r: human_age(g.get("last_message_at"), time.time())),
)


GAP = 2


def fit_columns(widths: list[int], priorities: list[int], width: int | None) -> list[int]:
    """Indices of the columns kept: most important first while they fit ``width``.

    Cells are never cut (a guest id is shown whole, a number never ellipsized); whole
    columns go instead, least important first. Priority 0 stays even if it overflows.
    """
    if width is None:
        return list(range(len(widths)))
    kept, used = [], 0
    for i in sorted(range(len(widths)), key=lambda i: (priorities[i], i)):
        need = widths[i] + (GAP if kept else 0)
        if priorities[i] == 0 or used + need <= width:
            kept.append(i)
            used += need
    return sorted(kept)


def render_table(guests: list[dict], rates: dict[str, dict] | None, width: int | None) -> list[str]:
    """The guests as aligned plain-text lines within ``width`` (None: every column).

    ``rates`` is None for status (no rate columns) and a dict (guest id → rates) for top.
    """
    columns = [c for c in COLUMNS if c.cell({}, None if rates is None else {}) is not None]
    header = [c.name for c in columns]
    rows = [[c.cell(g, None if rates is None else rates.get(g.get("id"), {})) or "-" for c in columns]
            for g in guests]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(columns))]
    kept = fit_columns(widths, [c.priority for c in columns], width)

    def line(cells: list[str]) -> str:
        parts = [cells[i].ljust(widths[i]) if columns[i].left else cells[i].rjust(widths[i]) for i in kept]
        return (" " * GAP).join(parts).rstrip()

    lines = [line(header)] + [line(row) for row in rows]
    hidden = [columns[i].name for i in range(len(columns)) if i not in kept]
    if hidden:
        lines += wrap(f"(hidden for width: {', '.join(hidden)}; widen the terminal or use --json)", width)
    if any(g.get("target_state") == "unreachable" for g in guests):
        lines += wrap("target!: unreachable, the guest keeps its working set and low watermark", width)
    return lines


def status_title(guests: list[dict], host: str, label: str = "balloon-host ") -> str:
    """Totals over the connected guests: a guest that left (a finished balloon-load run, a VM
    shut down) stays listed until the host forgets it, but holds no memory any more."""
    live = [g for g in guests if g.get("connected")]

    def total(key: str) -> str:
        return human_bytes(sum(g.get(key) or 0 for g in live))

    where = host.split("://", 1)[-1]
    title = f"{label}{where}: {len(live)} guest{'' if len(live) == 1 else 's'} up"
    if len(live) < len(guests):
        title += f" ({len(guests) - len(live)} down)"
    return (title + f"; memory {total('memory_bytes')}, actual {total('actual_bytes')}, "
            f"reported {total('reported_bytes')}")


def wrap(text: str, width: int | None) -> list[str]:
    """``text`` as lines of at most ``width``, broken between words (a title or an error must
    be read whole; only a word longer than the terminal is cut)."""
    if width is None or len(text) <= width:
        return [text]
    return textwrap.wrap(text, max(20, width), break_on_hyphens=False, subsequent_indent="  ")


def terminal_width(stream) -> int | None:
    """The width to fit: $COLUMNS when set, else the terminal's; None (no limit) in a pipe."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if stream.isatty():
        return shutil.get_terminal_size().columns
    return None


def _policy_note(decision: dict) -> str:
    detail = decision.get("detail") or {}
    if "backoff_s" in detail:
        n = detail.get("emergencies") or 1
        return (f"{detail.get('wanted')} held {detail['blocked_for_s']:.0f}s more (backoff "
                f"{human_duration(detail['backoff_s'])} after {n} emergency deflate{'s' if n > 1 else ''})")
    if "blocked_for_s" in detail:
        return f"{detail.get('wanted')} held {detail['blocked_for_s']:.0f}s more"
    if detail.get("signals"):
        return ",".join(map(str, detail["signals"]))
    if "wanted_bytes" in detail:
        return f"wanted {human_bytes(detail['wanted_bytes'])}"
    return "step-limited" if detail.get("step_limited") else ""


POLICY_COLUMNS = (
    ("guest", 0, lambda d: str(d.get("guest")), True),
    ("decision", 0, lambda d: str(d.get("direction")), True),
    ("target", 1, lambda d: human_bytes(d.get("target_bytes")), False),
    ("was", 3, lambda d: human_bytes(d.get("previous_bytes")), False),
    ("balloon", 2, lambda d: human_bytes((d.get("detail") or {}).get("balloon_bytes")), False),
    ("available", 2, lambda d: human_bytes((d.get("detail") or {}).get("available_bytes")), False),
    ("floor", 3, lambda d: human_bytes((d.get("detail") or {}).get("floor_bytes")), False),
    ("reason", 0, lambda d: str(d.get("reason")), True),
    ("rule", 4, lambda d: str(d.get("rule")), True),
    ("note", 5, _policy_note, True),
)


def render_policy(answer: dict, width: int | None) -> list[str]:
    """GET /api/v1/policy as a title line and one aligned line per guest's decision."""
    host = answer.get("host") or {}
    source = answer.get("source")
    if source == "budget":
        source = f"budget {human_bytes(answer.get('guest_memory_budget'))}"
    title = f"policy {answer.get('policy')} ({source}, every {answer.get('interval_s')}s)"
    if host:
        title += (f": host available {human_bytes(host.get('available_bytes'))} of "
                  f"{human_bytes(host.get('total_bytes'))} ({100 * (host.get('free_ratio') or 0):.1f}% free), "
                  f"PSI some {100 * (host.get('pressure_some') or 0):.1f}% full {100 * (host.get('pressure_full') or 0):.1f}%")
    age = answer.get("last_tick_age_s")
    title += "; no tick yet" if age is None else f"; last tick {human_duration(age)} ago"
    lines = wrap(title, width)
    if answer.get("last_error"):
        lines += wrap(f"last tick skipped: {answer['last_error']}", width)
    decisions = answer.get("decisions") or []
    if not decisions:
        return lines + ["(no guests)"]
    header = [c[0] for c in POLICY_COLUMNS]
    rows = [[c[2](d) or "-" for c in POLICY_COLUMNS] for d in decisions]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header))]
    kept = fit_columns(widths, [c[1] for c in POLICY_COLUMNS], width)

    def line(cells: list[str]) -> str:
        return (" " * GAP).join(cells[i].ljust(widths[i]) if POLICY_COLUMNS[i][3] else cells[i].rjust(widths[i])
                                for i in kept).rstrip()

    return lines + [line(header)] + [line(row) for row in rows]
