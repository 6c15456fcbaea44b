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
import os
import sys

from shared.runtime.config import OneLineParser, argument_type, parse_duration, parse_size

from .client import EXIT_FAILED, EXIT_OK, EXIT_USAGE, AdminClient, CtlError, UsageError, admin_token
from .commands import COMMANDS, MUTATING, WAIT_CONDITIONS

DEFAULT_HOST = "http://127.0.0.1:9470"


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
        return COMMANDS[args.command](client, args)
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
