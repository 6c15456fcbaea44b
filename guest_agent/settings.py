"""The guest's options: one argparse description, layered (flag > env > TOML > default) by
``shared.runtime.config.resolve_settings``, then checked into a frozen ``GuestSettings``.

As for the host, every problem is found here and reported as one line naming the option
(exit status 2), before the agent connects anywhere.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from shared.messages import valid_guest_id
from shared.runtime.addresses import (
    GUEST_KINDS,
    Address,
    default_address,
    parse_address,
    split_host_port,
)
from shared.runtime.config import (
    ConfigFileError,
    OneLineParser,
    add_common_options,
    argument_type,
    describe_layers,
    format_size,
    layered_settings,
    parse_duration,
    parse_size,
)
from shared.vocabulary import (
    DEFLATE_ON_OOM,
    HINTING,
    KNOWN_FEATURES,
    PAGE_SIZE,
    PFN32,
    RANGES52,
    SHARED_RAM,
    STATS,
)

ENV_PREFIX = "BALLOON_GUEST"
DEFAULT_HTTP = "auto"
#: ``--http auto``: the first free port from here, so guests started side by side all serve metrics.
AUTO_HTTP = ("127.0.0.1", 9471)
AUTO_HTTP_TRIES = 100
DEFAULT_MEMORY = 512 << 20
MAX_ORDER = 10
SOURCES = ("sim", "procfs", "linux")


class SettingsError(ValueError):
    """A setting is unusable; the message names the option."""


@dataclass(frozen=True, slots=True)
class GuestSettings:
    connect: Address
    id: str
    memory: int = 512 << 20
    source: str = "sim"
    workload: str = "idle"
    utilization: float | None = None
    rate: float | None = None
    size_mix: str | None = None
    period: float | None = None
    swing: float | None = None
    seed: int | None = None
    report_order: int = 9
    report_delay: float = 2.0
    reporting: bool = True
    capacity: int = 32
    http: tuple[str, int] | None = ("127.0.0.1", 9471)
    http_auto: bool = False  # http is where the search for a free port starts (--http auto)
    token_file: Path | None = None
    shared_ram: bool = False
    pfn32: bool = False
    features: tuple[str, ...] = ()
    tick: float = 0.05
    reconnect_max: float = 5.0
    handshake_timeout: float = 5.0
    procfs_root: Path = Path("/")
    scan_interval: float = 10.0
    stats_interval: float = 5.0
    canary_samples: int = 256
    log_format: str = "text"
    log_level: str = "info"

    def __post_init__(self) -> None:
        check(self)

    @property
    def pages(self) -> int:
        return self.memory // PAGE_SIZE

    def offered_features(self) -> tuple[str, ...]:
        """What HELLO offers: --features when given, else what the options imply."""
        if self.features:
            return self.features
        offered = [PFN32 if self.pfn32 else RANGES52, STATS]
        if self.source == "sim":
            offered.append(DEFLATE_ON_OOM)
            if self.shared_ram:
                offered.append(SHARED_RAM)
        elif self.source == "linux":
            # The host's RAM file *is* this machine's RAM (a VM's memory-backend-file):
            # shared-ram asks it to punch what is inflated or reported; nothing is mapped here.
            offered += [SHARED_RAM, HINTING]
        else:
            offered.append(HINTING)
        return tuple(offered)

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        return Path(self.token_file).read_text().strip()


def check(s: GuestSettings) -> None:
    if not valid_guest_id(s.id):
        raise SettingsError(f"--id: {s.id!r} must be 1-63 characters of [A-Za-z0-9_.-], starting alphanumeric")
    if s.source not in SOURCES:
        raise SettingsError(f"--source must be sim, procfs or linux, got {s.source!r}")
    if s.source == "sim":
        if s.memory < (1 << MAX_ORDER) * PAGE_SIZE or s.memory % ((1 << MAX_ORDER) * PAGE_SIZE):
            raise SettingsError(f"--memory must be a positive multiple of 4MiB (one order-{MAX_ORDER} block), "
                                f"got {format_size(s.memory)} ({s.memory} bytes)")
        if s.memory > 1 << 46:
            raise SettingsError("--memory: at most 64TiB")
    if not re.fullmatch(r"idle|churn|burst|trace:.+", s.workload):
        raise SettingsError(f"--workload must be idle, churn, burst or trace:FILE, got {s.workload!r}")
    if s.workload.startswith("trace:"):
        check_trace(Path(s.workload[6:]))
    if s.size_mix is not None:
        parse_size_mix(s.size_mix)
    if s.period is not None and not 0.1 <= s.period <= 86400:
        raise SettingsError(f"--period must be between 100ms and 24h, got {s.period:g}s")
    if s.utilization is not None and not 0.0 <= s.utilization <= 1.0:
        raise SettingsError(f"--utilization must be between 0 and 1, got {s.utilization}")
    if s.rate is not None and s.rate < 0:
        raise SettingsError(f"--rate cannot be negative, got {s.rate}")
    if not 0 <= s.report_order <= MAX_ORDER:
        raise SettingsError(f"--report-order must be 0..{MAX_ORDER}, got {s.report_order}")
    if not 1 <= s.capacity <= 4096:
        raise SettingsError(f"--capacity must be 1..4096 ranges, got {s.capacity}")
    if s.tick <= 0 or s.tick > 10:
        raise SettingsError(f"--tick must be in (0, 10] seconds, got {s.tick}")
    if s.reconnect_max <= 0:
        raise SettingsError(f"--reconnect-max must be positive, got {s.reconnect_max}")
    if s.handshake_timeout <= 0:
        raise SettingsError(f"--handshake-timeout must be positive, got {s.handshake_timeout}")
    if not 0.05 <= s.stats_interval <= 3600:
        raise SettingsError(f"--stats-interval must be 50ms..1h, got {s.stats_interval:g}s")
    unknown = set(s.features) - set(KNOWN_FEATURES)
    if unknown:
        raise SettingsError(f"--features: unknown {', '.join(sorted(unknown))} (known: {', '.join(KNOWN_FEATURES)})")
    if s.token_file is not None and not Path(s.token_file).is_file():
        raise SettingsError(f"--token-file: {s.token_file} is not a readable file")
    if s.shared_ram and s.source != "sim":
        raise SettingsError("--shared-ram needs --source sim (procfs and linux have no simulated RAM to map)")
    if s.log_format not in ("text", "json"):
        raise SettingsError(f"--log-format must be text or json, got {s.log_format!r}")


def _guest_address(text: str) -> Address:
    return parse_address(text, GUEST_KINDS)


def check_trace(path: Path) -> None:
    """A trace file is read and checked before anything starts (line numbers in the message)."""
    from .memory.workloads import parse_trace

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"--workload: cannot read trace file {path}: "
                            f"{getattr(error, 'strerror', None) or error}") from None
    try:
        parse_trace(text, MAX_ORDER)
    except ValueError as error:
        raise SettingsError(f"--workload: trace file {path}: {error}") from None


def parse_size_mix(text: str | None) -> dict[int, float] | None:
    """``0:70,2:20,9:10`` → {order: weight}; SettingsError naming the bad part."""
    if not text:
        return None
    mix: dict[int, float] = {}
    for part in str(text).split(","):
        order_text, sep, weight_text = part.strip().partition(":")
        try:
            order = int(order_text)
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise SettingsError(f"--size-mix: {part.strip()!r} is not ORDER:WEIGHT (e.g. 0:70,2:20,9:10)") from None
        if not 0 <= order <= MAX_ORDER:
            raise SettingsError(f"--size-mix: order {order} is not in 0..{MAX_ORDER}")
        if not (weight >= 0 and weight != float("inf")):
            raise SettingsError(f"--size-mix: weight {weight_text!r} of order {order} must be a number >= 0")
        if order in mix:
            raise SettingsError(f"--size-mix: order {order} is given twice")
        mix[order] = weight
    if sum(mix.values()) <= 0:
        raise SettingsError("--size-mix: the weights add up to 0")
    return mix


def _http(text: str):
    text = str(text).strip().lower()
    if text in ("off", "none", ""):
        return None
    if text == "auto":
        return "auto"
    return split_host_port(text)


class HelpFormatter(argparse.HelpFormatter):
    """Says ``(default: X)`` only where X tells something: not for flags, not for None
    (those helps say what happens without the option), not where the help names it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or isinstance(default, bool) or default == []
                or action.option_strings == [] or default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _fraction(text) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text!r} is not a fraction between 0 and 1")
    return value


def default_guest_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63].lstrip("-_.")
    return name if valid_guest_id(name) else "guest"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="balloon-guest",
        description="The guest side of the balloon channel: a simulated guest memory (or this "
                    "machine's free pages with --source procfs) whose free blocks are reported to "
                    "the host the way Linux's free page reporting does, plus a balloon the host can "
                    "size, over a socket that stands in for the virtqueues.",
        epilog=describe_layers(ENV_PREFIX, "stats-interval"),
        formatter_class=HelpFormatter,
    )
    add = parser.add_argument
    add("--connect", type=argument_type(_guest_address, "address"), default=default_address(), metavar="ADDR",
        help="the host daemon: unix:/path, tcp:HOST:PORT or vsock:CID:PORT (default: balloon-host's "
             "default --listen); inside a QEMU VM, serial:/dev/virtio-ports/NAME (a virtio-serial port "
             "whose host end QEMU connects to the daemon's unix listener)")
    add("--id", default=None, metavar="NAME",
        help="guest id (the host's label for this guest; default: the hostname)")
    add("--memory", type=argument_type(parse_size, "size"), default=None, metavar="SIZE",
        help="simulated guest RAM, e.g. 512MiB or 8GiB (a multiple of 4MiB; default 512MiB); with "
             "--source procfs, the RAM size announced to the host (default: the end of the highest "
             "System RAM range in /proc/iomem)")
    add("--source", choices=SOURCES, default="sim",
        help="sim: a simulated buddy allocator driven by --workload, reported and isolated like "
             "Linux; procfs: this machine's free pages from /proc/kpageflags (root), sent only as "
             "hints ('possibly reclaimable') when the host starts a hint command; linux: this "
             "machine's real memory (root, inside a VM whose RAM file the host punches): a balloon "
             "of mlocked pages, free page reports of memory the agent holds until the ACK, "
             "kpageflags hints, /proc/meminfo stats")
    add("--workload", default="idle", metavar="NAME",
        help="idle (a small working set allocated once), churn (steady alloc/free around "
             "--utilization, plus a 20%% surge every second half --period that takes reported pages "
             "back: REUSE), burst (periodic large alloc then free) or trace:FILE (replay; format in "
             "docs/WORKLOADS.md)")
    add("--utilization", type=argument_type(_fraction, "fraction"), default=None, metavar="FRACTION",
        help="the workload's target share of guest memory (workload default when unset)")
    add("--rate", type=argument_type(float, "number"), default=None, metavar="PER_SECOND",
        help="workload allocations per second (workload default when unset)")
    add("--size-mix", default=None, metavar="ORDER:WEIGHT,...",
        help="workload allocation orders and weights, e.g. 0:70,2:20,9:10 (workload default when unset)")
    add("--swing", type=argument_type(_fraction, "fraction"), default=None, metavar="FRACTION",
        help="churn: the surge's share of guest memory (default 0.2; 0 = steady churn that only "
             "recycles unreported memory and never sends REUSE)")
    add("--period", type=argument_type(parse_duration, "duration"), default=None, metavar="DURATION",
        help="cycle of the churn surge and of burst (defaults 23s and 13s: primes, so they never "
             "alias with --stats-interval)")
    add("--seed", type=int, default=None, help="seed of the workload's random choices (reproducible runs)")
    add("--report-order", type=int, default=9, metavar="ORDER",
        help="smallest block order reported (Linux: pageblock_order, 9 = 2MiB)")
    add("--report-delay", type=argument_type(parse_duration, "duration"), default="2s", metavar="DURATION",
        help="wait after a large free before a reporting pass (Linux: PAGE_REPORTING_DELAY, 2s)")
    add("--no-reporting", dest="reporting", action="store_false", default=True,
        help="send no free page reports (a balloon alone, e.g. to measure what it returns)")
    add("--capacity", type=int, default=32, metavar="RANGES",
        help="blocks per report, the size of the fixed range buffer (Linux: PAGE_REPORTING_CAPACITY, 32)")
    add("--http", type=argument_type(_http, "host:port"), default=DEFAULT_HTTP, metavar="HOST:PORT",
        help="serve /metrics and /healthz here: HOST:PORT, off, or auto (the default): 127.0.0.1 on "
             "the first free port from 9471, logged at start, so several guests run side by side")
    add("--token-file", type=Path, default=None, metavar="FILE",
        help="file holding this guest's token (the host's --token-file lists it)")
    add("--shared-ram", action="store_true", default=False,
        help="ask the host for a shared RAM file (host --ram-dir), map it and keep canaries in every "
             "allocated page, so lost guest data is counted")
    add("--pfn32", action="store_true", default=False,
        help="legacy mode: reports, inflate and deflate as 32-bit PFN arrays, at most 256 per message, one ack each")
    add("--features", action="append", default=[], metavar="NAME",
        help=f"offer exactly these features in HELLO (repeatable or comma-separated; known: "
             f"{', '.join(KNOWN_FEATURES)}); default: implied by the other options")
    add("--tick", type=argument_type(parse_duration, "duration"), default="50ms", metavar="DURATION",
        help="workload step interval, and the shortest gap between two of the agent's ticks (an idle "
             "agent sleeps until its next deadline or message instead)")
    add("--reconnect-max", type=argument_type(parse_duration, "duration"), default="5s", metavar="DURATION",
        help="longest wait between reconnect attempts (exponential backoff with jitter)")
    add("--handshake-timeout", type=argument_type(parse_duration, "duration"), default="5s", metavar="DURATION",
        help="how long to wait for the host's WELCOME")
    add("--procfs-root", type=Path, default=Path("/"), metavar="DIR",
        help="root holding proc/kpageflags, proc/kpagecount and proc/iomem (for fixtures)")
    add("--scan-interval", type=argument_type(parse_duration, "duration"), default="10s", metavar="DURATION",
        help="procfs and linux sources: how often to rescan free pages (/proc/kpageflags) for the "
             "possibly-reclaimable figure, when MemFree moved 16MiB since the last scan; a host hint "
             "command always gets a fresh scan; 0 = only for hint commands")
    add("--stats-interval", type=argument_type(parse_duration, "duration"), default="5s", metavar="DURATION",
        help="how often STATS (free/total/available memory, virtio-balloon's stats queue) go to the host; "
             "the host's free/usable figures and their age (balloonctl status) follow it, and a host "
             "policy freezes a guest whose stats grow stale. QEMU's guest-stats-polling-interval, "
             "libvirt's 'dommemstat --period'")
    add("--canary-samples", type=int, default=256, metavar="N",
        help="with --shared-ram: allocations whose canaries the sampling sweep checks every 2s")
    add_common_options(parser, "guest")
    return parser


def parse_settings(argv, environ=None) -> GuestSettings:
    """argv + environment + config file → GuestSettings (argparse exits 2 on bad syntax)."""
    environ = os.environ if environ is None else environ
    try:
        ns = layered_settings(build_parser(), argv, ENV_PREFIX, environ, "guest")
    except ConfigFileError as error:
        raise SettingsError(str(error)) from None
    features = tuple(part.strip() for item in ns.features for part in str(item).split(",") if part.strip())
    if ns.pfn32 and features and PFN32 not in features:
        features = features + (PFN32,)
    return GuestSettings(
        connect=ns.connect, id=ns.id or default_guest_id(), source=ns.source,
        memory=ns.memory if ns.memory is not None else (DEFAULT_MEMORY if ns.source == "sim" else 0),
        workload=ns.workload, utilization=ns.utilization, rate=ns.rate, size_mix=ns.size_mix, period=ns.period, swing=ns.swing,
        seed=ns.seed, report_order=ns.report_order, report_delay=ns.report_delay, reporting=ns.reporting,
        capacity=ns.capacity,
        http=AUTO_HTTP if ns.http == "auto" else ns.http, http_auto=ns.http == "auto", token_file=ns.token_file, shared_ram=ns.shared_ram, pfn32=ns.pfn32,
        features=features, tick=ns.tick, reconnect_max=ns.reconnect_max,
        handshake_timeout=ns.handshake_timeout, procfs_root=ns.procfs_root,
        scan_interval=ns.scan_interval, canary_samples=ns.canary_samples,
        stats_interval=ns.stats_interval,
        log_format=ns.log_format, log_level=ns.log_level,
    )
