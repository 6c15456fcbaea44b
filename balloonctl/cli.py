"""balloonctl: look at and steer a running balloon-host through its admin API.

    balloonctl status [GUEST] [--json]     the guests the host knows, as a table
    balloonctl top [--interval 1s]         live view with rates from successive polls (q quits)
    balloonctl setmem GUEST SIZE           the memory GUEST keeps, as virsh setmem (admin token)
    balloonctl target GUEST SIZE           the balloon size: memory taken from GUEST (admin token)
    balloonctl hint GUEST                  start a free page hinting command (admin token)
    balloonctl wait GUEST [--for target]   until GUEST is connected (or its balloon settled)

Columns (the same words as the /ui dashboard): memory (the guest's RAM), actual (what it
keeps: memory - balloon, QEMU's "actual"), balloon (inflated now), target (balloon asked
for; "!" = the guest cannot get there), reported (free pages reported), usable (what the
guest could still allocate, virtio AVAIL of its last STATS), stats (age of that STATS),
report/s and inflate/s (top), p99 5m (the host's batch apply time over the last 5
minutes, an upper bucket edge: "<=250us" means at most 250 us). The title's totals count
connected guests only. A narrow terminal drops the least important columns first (never
a guest id, never part of a number); in a pipe every column is printed unless $COLUMNS is
set. top keeps polling while the host is down and says so, and exits 1 if the host was
unreachable at its last poll (so a script's top --iterations N sees it).

setmem refuses to leave a guest less than 16MiB (no guest runs in less; the balloon driver
would stop short anyway) and warns when the guest uses more than it would keep.

Sizes: K/M/G/T are binary as in QEMU (256M = 256MiB); KB/MB/GB are refused as ambiguous.

The host is ``--host URL`` (default http://127.0.0.1:9470, or $BALLOON_CTL_HOST). setmem,
target and hint change things, so they send the host's admin token: from ``--token-file``
(or $BALLOON_CTL_TOKEN_FILE) — the file the host reads with ``--admin-token-file`` — or else
the one the host generated at start, found by itself in DIR/admin-PORT.token (PORT of
--host; DIR /run/balloon as root, else $XDG_RUNTIME_DIR/balloon or /tmp/balloon-UID), which
only the host's user and root can read.

Exit codes: 0 done; 1 the host is unreachable or refused the request (one line on
stderr says why); 2 bad command line, or a request the host calls malformed (HTTP 400,
e.g. a balloon larger than the guest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from shared.admin_token import TokenFileError, admin_token_path, load_admin_token
from shared.config import OneLineParser, argument_type, format_size, parse_duration, parse_size
from shared.vocabulary import BATCH_KINDS, INFLATE, PAGE_SIZE

DEFAULT_HOST = "http://127.0.0.1:9470"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    """Something the user must be told in one line (exit 1)."""


class UsageError(CtlError):
    """A request that is wrong whatever the host says (exit 2)."""


# -- talking to the host ------------------------------------------------------------------


class AdminClient:
    """The admin API of docs/API.md over urllib (a CLI needs no event loop)."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 5.0) -> None:
        if "://" not in base:
            base = "http://" + base
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            kind = UsageError if error.code == 400 else CtlError  # 400: what we asked for is wrong (exit 2)
            raise kind(f"{method} {path}: HTTP {error.code}: {_error_text(error)}") from None
        except urllib.error.URLError as error:
            raise CtlError(f"cannot reach the host at {self.base}: {_reason(error.reason)}") from None
        except (TimeoutError, OSError) as error:
            raise CtlError(f"cannot reach the host at {self.base}: {_reason(error)}") from None
        try:
            return json.loads(payload)
        except ValueError:
            raise CtlError(f"{method} {path}: the host answered something that is not JSON") from None

    def guests(self) -> list[dict]:
        answer = self._call("GET", "/api/v1/guests")
        if not isinstance(answer, dict) or not isinstance(answer.get("guests"), list):
            raise CtlError("GET /api/v1/guests: unexpected answer shape")
        return answer["guests"]

    def guest(self, guest: str) -> dict:
        return self._call("GET", f"/api/v1/guests/{urllib.parse.quote(guest, safe='')}")

    def set_target(self, guest: str, size_bytes: int) -> dict:
        return self._call("POST", f"/api/v1/guests/{urllib.parse.quote(guest, safe='')}/target",
                          {"bytes": size_bytes})

    def policy(self) -> dict:
        answer = self._call("GET", "/api/v1/policy")
        if not isinstance(answer, dict) or not isinstance(answer.get("decisions"), list):
            raise CtlError("GET /api/v1/policy: unexpected answer shape")
        return answer

    def hint(self, guest: str) -> dict:
        return self._call("POST", f"/api/v1/guests/{urllib.parse.quote(guest, safe='')}/hint", {})


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except (ValueError, OSError):
        pass
    return error.reason or "error"


def _reason(reason) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


# -- numbers for people -------------------------------------------------------------------


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


# -- rates from successive polls -----------------------------------------------------------


class RateTracker:
    """Per-guest rates (batches/s, reported/inflated bytes/s) from two polls of the counters."""

    def __init__(self) -> None:
        self.previous: dict[str, tuple[float, dict]] = {}

    def update(self, guests: list[dict], now: float) -> dict[str, dict]:
        rates = {}
        seen = {}
        for guest in guests:
            gid = guest.get("id")
            counters = {"batches": sum((guest.get("batches") or {}).values()),
                        **{kind: (guest.get("pages_total") or {}).get(kind, 0)
                           for kind in BATCH_KINDS}}
            seen[gid] = (now, counters)
            before = self.previous.get(gid)
            if before is None or now <= before[0]:
                rates[gid] = {"batches_per_s": None, "report_bytes_per_s": None,
                              "inflate_bytes_per_s": None}
                continue
            elapsed = now - before[0]
            delta = {key: max(0, counters[key] - before[1].get(key, 0)) for key in counters}
            rates[gid] = {"batches_per_s": delta["batches"] / elapsed,
                          "report_bytes_per_s": delta["report"] * PAGE_SIZE / elapsed,
                          "inflate_bytes_per_s": delta[INFLATE] * PAGE_SIZE / elapsed}
        self.previous = seen
        return rates


# -- tables ------------------------------------------------------------------------------


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
    import textwrap

    return textwrap.wrap(text, max(20, width), break_on_hyphens=False, subsequent_indent="  ")

def terminal_width(stream) -> int | None:
    """The width to fit: $COLUMNS when set, else the terminal's; None (no limit) in a pipe."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if stream.isatty():
        return shutil.get_terminal_size().columns
    return None


# -- commands ----------------------------------------------------------------------------


def cmd_status(client: AdminClient, args) -> int:
    guests = [client.guest(args.guest)] if args.guest else client.guests()
    if args.json:
        print(json.dumps(guests[0] if args.guest else {"guests": guests}, indent=2))
        return EXIT_OK
    width = terminal_width(sys.stdout)
    print("\n".join([*wrap(status_title(guests, client.base), width), *render_table(guests, None, width)]))
    return EXIT_OK


@contextmanager
def _keys(stop: threading.Event):
    """On a terminal, watch stdin for 'q' in cbreak mode (restored on exit)."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready and os.read(fd, 1) in (b"q", b"Q"):
                stop.set()
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

#: top's JSON lines: these keys of each GUEST, plus free_bytes and the rates.
TOP_JSON_KEYS = ("id", "connected", "memory_bytes", "actual_bytes", "reported_bytes", "inflated_bytes",
                 "target_bytes", "target_state", "reclaimed_bytes", "unused_bytes", "usable_bytes",
                 "stats_age_seconds", "window", "apply_seconds_p99", "apply_seconds_p99_recent")


def top_frame(client: AdminClient, tracker: RateTracker, interval: float, width: int | None
              ) -> tuple[list[str], dict]:
    """(lines to show, JSON record) of one poll; an unreachable host makes a frame too."""
    stamp = time.strftime("%H:%M:%S")
    try:
        guests = client.guests()
    except CtlError as error:
        return (wrap(f"{stamp} host unreachable, retrying every {interval:g}s: {error}", width),
                {"time": time.time(), "error": str(error), "guests": None})
    rates = tracker.update(guests, time.monotonic())
    total_rate = sum(r["batches_per_s"] or 0 for r in rates.values())
    title = (f"{stamp} {status_title(guests, client.base, label='')}; {human_rate(total_rate, ' batches/s')}; "
             f"every {interval:g}s, q quits")
    record = {"time": time.time(), "guests": [
        {**{key: g.get(key) for key in TOP_JSON_KEYS}, "free_bytes": free_bytes(g), **rates.get(g.get("id"), {})}
        for g in guests]}
    return [*wrap(title, width), *render_table(guests, rates, width)], record


def cmd_top(client: AdminClient, args) -> int:
    """Poll until q, Ctrl-C or --iterations; keep polling (and say so) while the host is down.
    Exit 1 when the last poll found no host (a script's ``top --iterations 1`` must see that).

    On a terminal each frame is redrawn in place (cursor home, clear to the end) as top(1)
    does, and the last frame stays on screen ending in a newline; in a pipe every frame is
    printed followed by a blank line, or as one JSON line with --json.
    """
    tracker = RateTracker()
    stop = threading.Event()
    out = sys.stdout
    redraw = out.isatty() and not args.json
    iteration = 0
    reachable = True
    try:
        with _keys(stop):
            while not stop.is_set() and (args.iterations is None or iteration < args.iterations):
                if iteration and stop.wait(args.interval):
                    break
                width = terminal_width(out)
                lines, record = top_frame(client, tracker, args.interval, width)
                reachable = record.get("guests") is not None
                lines += _footer(args.footer_file, width)
                if args.json:
                    out.write(json.dumps(record) + "\n")
                elif redraw:
                    out.write("\x1b[H\x1b[J" + "\n".join(lines) + "\n")
                else:
                    out.write("\n".join(lines) + "\n\n")
                out.flush()
                iteration += 1
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `balloonctl top | head`
        with contextlib.suppress(OSError):
            sys.stderr.close()
    return EXIT_OK if reachable else EXIT_FAILED


#: The least memory setmem/target leave a guest: no guest runs in less, and a balloon asked
#: to take everything is a typo (``setmem g1 0``), not a request the driver could meet.
MIN_KEEP = 16 << 20


def _check_keep(guest: dict, name: str, keep: int) -> None:
    """UsageError below MIN_KEEP; a warning on stderr when the guest uses more than it would keep."""
    if keep < MIN_KEEP:
        raise UsageError(f"{name} would keep {human_bytes(max(0, keep))}: no guest runs in less than "
                         f"{human_bytes(MIN_KEEP)} (give the memory it keeps, e.g. setmem {name} 192MiB)")
    memory, usable = guest.get("memory_bytes"), guest.get("usable_bytes")
    if isinstance(memory, int) and isinstance(usable, int) and memory - usable > keep:
        print(f"balloonctl: warning: {name} uses about {human_bytes(memory - usable)} now; the balloon will "
              f"stop short of keeping {human_bytes(keep)} (shown as target!)", file=sys.stderr)


def _footer(path: str | None, width: int | None) -> list[str]:
    """``--footer-file``'s lines under the frame, read again every poll (make demo writes what it
    is doing there, so its URLs and hints stay on screen under the live view)."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as footer:
            text = footer.read()
    except OSError:
        return []
    lines = [""]
    for line in text.splitlines():
        lines += wrap(line, width) if line else [""]
    return lines if len(lines) > 1 else []


def cmd_target(client: AdminClient, args) -> int:
    guest = client.guest(args.guest)
    if isinstance(guest.get("memory_bytes"), int) and args.size <= guest["memory_bytes"]:
        _check_keep(guest, args.guest, guest["memory_bytes"] - args.size)
    answer = client.set_target(args.guest, args.size)
    pages = answer.get("target_pages") if isinstance(answer, dict) else None
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"{args.guest}: balloon target {human_bytes((pages or 0) * PAGE_SIZE)} ({pages} pages)")
    return EXIT_OK


def cmd_setmem(client: AdminClient, args) -> int:
    """The memory the guest keeps, as virsh setmem / QEMU's ``balloon``: balloon = memory − SIZE."""
    guest = client.guest(args.guest)
    memory = guest.get("memory_bytes")
    if not isinstance(memory, int):
        raise CtlError(f"GET /api/v1/guests/{args.guest}: the answer has no memory_bytes")
    if args.size > memory:
        raise UsageError(f"{args.guest} has {human_bytes(memory)} of memory: it cannot keep {human_bytes(args.size)}")
    _check_keep(guest, args.guest, args.size)
    answer = client.set_target(args.guest, memory - args.size)
    pages = answer.get("target_pages") if isinstance(answer, dict) else None
    if args.json:
        print(json.dumps(answer))
    else:
        balloon = (pages or 0) * PAGE_SIZE
        print(f"{args.guest}: keeps {human_bytes(memory - balloon)} of {human_bytes(memory)} "
              f"(balloon target {human_bytes(balloon)}, {pages} pages)")
    return EXIT_OK


#: balloonctl wait --for CONDITION: what each condition asks of the GUEST object.
WAIT_CONDITIONS = {
    "connected": lambda g: bool(g.get("connected")),
    "stats": lambda g: bool(g.get("connected")) and g.get("stats_age_seconds") is not None,
    "target": lambda g: g.get("target_state") in ("reached", "unreachable"),
}


def cmd_wait(client: AdminClient, args) -> int:
    """Poll until the guest meets the condition (kubectl wait): the host may still be starting."""
    deadline = time.monotonic() + args.timeout_wait
    last = "no answer yet"
    while True:
        try:
            guest = client.guest(args.guest)
            if WAIT_CONDITIONS[args.condition](guest):
                if args.condition == "target" and guest.get("target_state") == "unreachable":
                    raise CtlError(f"{args.guest}: balloon target {human_bytes(guest.get('target_bytes'))} is "
                                   f"unreachable (inflated {human_bytes(guest.get('inflated_bytes'))})")
                print(f"{args.guest}: {args.condition}")
                return EXIT_OK
            last = f"{args.guest} is not {args.condition} yet"
        except CtlError as error:
            if "unreachable (inflated" in str(error):
                raise
            last = str(error)
        if time.monotonic() >= deadline:
            raise CtlError(f"gave up after {args.timeout_wait:g}s waiting for {args.guest} to be "
                           f"{args.condition}: {last}")
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


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


def cmd_policy(client: AdminClient, args) -> int:
    answer = client.policy()
    if args.guest is not None:
        answer["decisions"] = [d for d in answer["decisions"] if d.get("guest") == args.guest]
        if not answer["decisions"]:
            raise CtlError(f"the policy has no decision for guest {args.guest!r}")
    if args.json:
        print(json.dumps(answer))
    else:
        print("\n".join(render_policy(answer, terminal_width(sys.stdout))))
    return EXIT_OK


def cmd_hint(client: AdminClient, args) -> int:
    answer = client.hint(args.guest)
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"{args.guest}: hinting command {answer.get('cmd_id')} started")
    return EXIT_OK


# -- command line ------------------------------------------------------------------------


#: Commands that change something: the host wants its admin token for them.
MUTATING = ("target", "setmem", "hint")


def admin_token(host: str, token_file: str | None = None, environ=None) -> str:
    """The admin token for ``host``: ``--token-file``, $BALLOON_CTL_TOKEN_FILE, or the file
    the host generated (shared.admin_token: the same rule the host writes by)."""
    environ = os.environ if environ is None else environ
    given = token_file or environ.get("BALLOON_CTL_TOKEN_FILE") or None
    if given:
        path = given
    else:
        url = urllib.parse.urlsplit(host if "://" in host else "http://" + host)
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError:
            raise UsageError(f"--host {host}: not a URL with a valid port") from None
        path = admin_token_path(port)
        if not os.path.exists(path):
            raise CtlError(f"no admin token at {path}: the host writes it there at start unless it runs with "
                           "--admin-token-file or --admin-token-dir (then give that file with --token-file)")
        if not os.access(path, os.R_OK):
            raise CtlError(f"cannot read the admin token {path}: only the host's user and root may "
                           "(run balloonctl as one of them, or give --token-file)")
    try:
        return load_admin_token(path)
    except TokenFileError as error:
        raise CtlError(str(error)) from None


def _interval(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("the interval must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default=argparse.SUPPRESS, metavar="URL",
                        help=f"the host's admin URL (default $BALLOON_CTL_HOST or {DEFAULT_HOST})")
    common.add_argument("--timeout", type=argument_type(parse_duration, "duration"), default=argparse.SUPPRESS,
                        metavar="S", help="seconds to wait for the host (default 5)")
    parser = OneLineParser(prog="balloonctl", parents=[common], description=__doc__.split("\n")[0],
                           epilog="\n".join(__doc__.split("\n")[1:]),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)
    status = sub.add_parser("status", parents=[common], help="the guests as a table (or --json)")
    status.add_argument("guest", nargs="?", help="only this guest")
    status.add_argument("--json", action="store_true", help="the admin API's JSON as is")
    top = sub.add_parser("top", parents=[common], help="live per-guest view; q or Ctrl-C quits")
    top.add_argument("--interval", type=argument_type(_interval, "duration"), default=1.0, metavar="DURATION",
                     help="time between polls (default 1s)")
    top.add_argument("--iterations", type=int, metavar="N", help="stop after N polls (for scripts and tests)")
    top.add_argument("--json", action="store_true", help="one JSON line per poll, with rates")
    top.add_argument("--footer-file", metavar="FILE",
                     help="show this file's lines under every frame, re-read each poll (make demo's hints)")
    wait = sub.add_parser("wait", parents=[common], help="wait until a guest is connected (or its target settled)")
    wait.add_argument("guest")
    wait.add_argument("--for", dest="condition", choices=tuple(WAIT_CONDITIONS), default="connected",
                      help="connected (default), stats (its first STATS arrived) or target (the balloon "
                           "reached its target; exit 1 if the host says it is unreachable)")
    wait.add_argument("--max-wait", dest="timeout_wait", type=argument_type(parse_duration, "duration"),
                      default=30.0, metavar="DURATION", help="give up after this long (default 30s; exit 1)")
    policy = sub.add_parser("policy", parents=[common],
                            help="the balloon policy's last decisions: target, direction, reason and inputs per guest")
    policy.add_argument("guest", nargs="?", help="only this guest")
    policy.add_argument("--json", action="store_true", help="GET /api/v1/policy as is")
    for name, helptext in (("setmem", "set the memory a guest keeps (virsh setmem; balloon = memory - SIZE)"),
                           ("target", "set a guest's balloon size (the memory taken from it)"),
                           ("hint", "start free page hinting")):
        command = sub.add_parser(name, parents=[common], help=helptext)
        command.add_argument("guest")
        if name == "setmem":
            command.add_argument("size", type=argument_type(parse_size, "size"),
                                 help="memory the guest keeps, e.g. 192MiB or 1G (M = MiB, as QEMU)")
        if name == "target":
            command.add_argument("size", type=argument_type(parse_size, "size"),
                                 help="balloon size, e.g. 64MiB or 1G (M = MiB, as QEMU), or bytes")
        command.add_argument("--token-file", metavar="FILE",
                             help="the admin token's file (default $BALLOON_CTL_TOKEN_FILE, else the token "
                                  "the host generated: DIR/admin-PORT.token, see below)")
        command.add_argument("--json", action="store_true", help="print the host's answer as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    host = getattr(args, "host", None) or os.environ.get("BALLOON_CTL_HOST") or DEFAULT_HOST
    try:
        token = admin_token(host, getattr(args, "token_file", None)) if args.command in MUTATING else None
        client = AdminClient(host, token, getattr(args, "timeout", 5.0))
        handler = {"status": cmd_status, "top": cmd_top, "target": cmd_target, "setmem": cmd_setmem,
                   "wait": cmd_wait, "hint": cmd_hint, "policy": cmd_policy}[args.command]
        return handler(client, args)
    except UsageError as error:
        print(f"balloonctl: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as error:
        print(f"balloonctl: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
