"""The commands: each takes the client and the parsed arguments and returns the exit code.

``cli.main`` turns ``CtlError``/``UsageError`` into one stderr line and exit 1/2, so a
command only raises; what it prints on success goes to stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import threading
import time
from contextlib import contextmanager

from shared.vocabulary import PAGE_SIZE

from .client import EXIT_FAILED, EXIT_OK, AdminClient, CtlError, UsageError
from .rates import RateTracker
from .render import (
    free_bytes,
    human_bytes,
    human_rate,
    render_policy,
    render_table,
    status_title,
    terminal_width,
    wrap,
)

#: Commands that change something: the host wants its admin token for them.
MUTATING = ("target", "setmem", "hint")


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
                lines += footer_lines(args.footer_file, width)
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


def footer_lines(path: str | None, width: int | None) -> list[str]:
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


#: balloonctl COMMAND -> its function.
COMMANDS = {"status": cmd_status, "top": cmd_top, "target": cmd_target, "setmem": cmd_setmem,
            "wait": cmd_wait, "hint": cmd_hint, "policy": cmd_policy}
