"""balloonctl: look at and steer a running balloon-host through its admin API.

    balloonctl status [GUEST] [--json]     the guests the host knows, as a table
    balloonctl top [--interval 1s]         live view with rates from successive polls (q quits)
    balloonctl target GUEST SIZE           set a guest's balloon size (POST, admin token)
    balloonctl hint GUEST                  start a free page hinting command (POST, admin token)

The host is ``--host URL`` (default http://127.0.0.1:9470, or $BALLOON_CTL_HOST). The
admin token comes from ``--token-file`` (or $BALLOON_CTL_TOKEN_FILE): the file holds
the token alone, the same file the host reads with ``--admin-token-file``.

Exit codes: 0 done; 1 the host is unreachable or refused the request (one line on
stderr says why); 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager

from shared.config import parse_size
from shared.vocabulary import BATCH_KINDS, INFLATE, PAGE_SIZE

DEFAULT_HOST = "http://127.0.0.1:9470"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CtlError(Exception):
    """Something the user must be told in one line (exit 1)."""


# -- talking to the host ------------------------------------------------------------------


class AdminClient:
    """The admin API of CONTRACT.md over urllib (a CLI needs no event loop)."""

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
            raise CtlError(f"{method} {path}: HTTP {error.code}: {_error_text(error)}") from None
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
    if value is None:
        return "-"
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= factor:
            return f"{value / factor:.1f} {unit}"
    return f"{value:.0f} B"


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
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.2f} ms"
    return f"{value:.2f} s"


def human_age(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    age = max(0.0, now - timestamp)
    if age < 60:
        return f"{age:.0f}s ago"
    if age < 3600:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.1f}h ago"


def free_bytes(guest: dict) -> int | None:
    """Free memory as the guest last said in STATS (virtio tag 4, MEMFREE), when the host shows it."""
    stats = guest.get("stats") or {}
    for key in ("free_bytes", "memfree", "4", 4):
        if key in stats and isinstance(stats[key], int | float):
            return int(stats[key])
    return guest.get("free_bytes")


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


def status_table(guests: list[dict], now: float):
    from rich.table import Table

    table = Table(title=f"balloon-host: {len(guests)} guest(s), "
                        f"{sum(1 for g in guests if g.get('connected'))} connected", title_justify="left")
    for column, justify in (("guest", "left"), ("conn", "center"), ("memory", "right"), ("reported", "right"),
                            ("inflated", "right"), ("target", "right"), ("reclaimed", "right"),
                            ("batches", "right"), ("window", "right"), ("apply p99", "right"),
                            ("rejected", "right"), ("errors", "right"), ("last message", "right")):
        table.add_column(column, justify=justify)
    for guest in guests:
        window = guest.get("window") or {}
        table.add_row(
            str(guest.get("id")), "●" if guest.get("connected") else "○",
            human_bytes(guest.get("memory_bytes")), human_bytes(guest.get("reported_bytes")),
            human_bytes(guest.get("inflated_bytes")), human_bytes(guest.get("target_bytes")),
            human_bytes(guest.get("reclaimed_bytes")), str(sum((guest.get("batches") or {}).values())),
            f"{window.get('in_use', 0)}/{window.get('size', 0)}", human_seconds(guest.get("apply_seconds_p99")),
            str(sum((guest.get("rejected_pages") or {}).values())), str(guest.get("errors", 0)),
            human_age(guest.get("last_message_at"), now))
    return table


def top_table(guests: list[dict], rates: dict[str, dict], host: str, interval: float):
    from rich.table import Table

    connected = sum(1 for g in guests if g.get("connected"))
    totals = {key: sum(g.get(key) or 0 for g in guests)
              for key in ("memory_bytes", "reported_bytes", "inflated_bytes")}
    batch_rate = sum(r["batches_per_s"] or 0 for r in rates.values())
    table = Table(title=f"balloonctl top — {host} — {connected}/{len(guests)} connected, "
                        f"memory {human_bytes(totals['memory_bytes'])}, reported "
                        f"{human_bytes(totals['reported_bytes'])}, inflated {human_bytes(totals['inflated_bytes'])}, "
                        f"{human_rate(batch_rate, ' batches/s')} (every {interval:g}s, q quits)",
                  title_justify="left")
    for column in ("guest", "conn", "memory", "free", "reported", "inflated", "target", "reclaimed",
                   "batches/s", "report/s", "inflate/s", "window", "apply p99"):
        table.add_column(column, justify="left" if column == "guest" else "right")
    for guest in guests:
        gid = guest.get("id")
        rate = rates.get(gid, {})
        window = guest.get("window") or {}
        report_rate = rate.get("report_bytes_per_s")
        inflate_rate = rate.get("inflate_bytes_per_s")
        table.add_row(
            str(gid), "●" if guest.get("connected") else "○", human_bytes(guest.get("memory_bytes")),
            human_bytes(free_bytes(guest)), human_bytes(guest.get("reported_bytes")),
            human_bytes(guest.get("inflated_bytes")), human_bytes(guest.get("target_bytes")),
            human_bytes(guest.get("reclaimed_bytes")), human_rate(rate.get("batches_per_s")),
            "-" if report_rate is None else human_bytes(report_rate) + "/s",
            "-" if inflate_rate is None else human_bytes(inflate_rate) + "/s",
            f"{window.get('in_use', 0)}/{window.get('size', 0)}", human_seconds(guest.get("apply_seconds_p99")))
    return table


# -- commands ----------------------------------------------------------------------------


def cmd_status(client: AdminClient, args) -> int:
    from rich.console import Console

    guests = [client.guest(args.guest)] if args.guest else client.guests()
    if args.json:
        print(json.dumps(guests[0] if args.guest else {"guests": guests}, indent=2))
        return EXIT_OK
    Console().print(status_table(guests, time.time()))
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


def cmd_top(client: AdminClient, args) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    tracker = RateTracker()
    stop = threading.Event()
    live_view = console.is_terminal and not args.json
    iteration = 0

    def frame():
        guests = client.guests()
        now = time.monotonic()
        rates = tracker.update(guests, now)
        return guests, rates

    try:
        with _keys(stop):
            if live_view:
                guests, rates = frame()
                with Live(top_table(guests, rates, client.base, args.interval), console=console,
                          auto_refresh=False, screen=False) as live:
                    iteration = 1
                    while not stop.is_set() and (args.iterations is None or iteration < args.iterations):
                        stop.wait(args.interval)
                        if stop.is_set():
                            break
                        guests, rates = frame()
                        live.update(top_table(guests, rates, client.base, args.interval), refresh=True)
                        iteration += 1
            else:
                while not stop.is_set() and (args.iterations is None or iteration < args.iterations):
                    if iteration:
                        stop.wait(args.interval)
                    guests, rates = frame()
                    if args.json:
                        print(json.dumps({"time": time.time(), "guests": [
                            {**{k: g.get(k) for k in ("id", "connected", "memory_bytes", "reported_bytes",
                                                       "inflated_bytes", "target_bytes", "reclaimed_bytes",
                                                       "window", "apply_seconds_p99")},
                             "free_bytes": free_bytes(g), **rates.get(g.get("id"), {})} for g in guests]}),
                              flush=True)
                    else:
                        console.print(top_table(guests, rates, client.base, args.interval))
                    iteration += 1
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_target(client: AdminClient, args) -> int:
    answer = client.set_target(args.guest, args.size)
    pages = answer.get("target_pages") if isinstance(answer, dict) else None
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"{args.guest}: balloon target {human_bytes((pages or 0) * PAGE_SIZE)} ({pages} pages)")
    return EXIT_OK


def cmd_hint(client: AdminClient, args) -> int:
    answer = client.hint(args.guest)
    if args.json:
        print(json.dumps(answer))
    else:
        print(f"{args.guest}: hinting command {answer.get('cmd_id')} started")
    return EXIT_OK


# -- command line ------------------------------------------------------------------------


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _interval(text: str) -> float:
    from shared.config import parse_duration

    try:
        value = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the interval must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default=argparse.SUPPRESS, metavar="URL",
                        help=f"the host's admin URL (default $BALLOON_CTL_HOST or {DEFAULT_HOST})")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="S",
                        help="seconds to wait for the host (default 5)")
    parser = argparse.ArgumentParser(prog="balloonctl", parents=[common], description=__doc__.split("\n")[0],
                                     epilog="\n".join(__doc__.split("\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser("status", parents=[common], help="the guests as a table (or --json)")
    status.add_argument("guest", nargs="?", help="only this guest")
    status.add_argument("--json", action="store_true", help="the admin API's JSON as is")
    top = sub.add_parser("top", parents=[common], help="live per-guest view; q or Ctrl-C quits")
    top.add_argument("--interval", type=_interval, default=1.0, metavar="DURATION",
                     help="time between polls (default 1s)")
    top.add_argument("--iterations", type=int, metavar="N", help="stop after N polls (for scripts and tests)")
    top.add_argument("--json", action="store_true", help="one JSON line per poll, with rates")
    for name, helptext in (("target", "set a guest's balloon size"), ("hint", "start free page hinting")):
        command = sub.add_parser(name, parents=[common], help=helptext)
        command.add_argument("guest")
        if name == "target":
            command.add_argument("size", type=_size, help="balloon size, e.g. 256MiB, 1GiB or bytes")
        command.add_argument("--token-file", metavar="FILE",
                             help="admin token file (default $BALLOON_CTL_TOKEN_FILE)")
        command.add_argument("--json", action="store_true", help="print the host's answer as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    host = getattr(args, "host", None) or os.environ.get("BALLOON_CTL_HOST") or DEFAULT_HOST
    token = None
    token_file = getattr(args, "token_file", None) or (
        os.environ.get("BALLOON_CTL_TOKEN_FILE") if args.command in ("target", "hint") else None)
    try:
        if token_file:
            try:
                token = open(token_file).read().strip()
            except OSError as error:
                raise CtlError(f"cannot read the token file {token_file}: {error.strerror}") from None
            if not token:
                raise CtlError(f"the token file {token_file} is empty")
        client = AdminClient(host, token, getattr(args, "timeout", 5.0))
        handler = {"status": cmd_status, "top": cmd_top, "target": cmd_target, "hint": cmd_hint}[args.command]
        return handler(client, args)
    except CtlError as error:
        print(f"balloonctl: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
