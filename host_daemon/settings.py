"""The host's options: one argparse description, layered (flag > env > TOML > default)
by ``shared.runtime.config.resolve_settings``, then checked into a frozen ``HostSettings``.

Validation happens here, before anything listens, so a bad value is one clear line on
stderr and exit status 2 (argparse's convention), never a traceback at the first guest.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from shared.runtime.addresses import (
    ROOT_SOCKET_PATH,
    Address,
    default_address,
    parse_address,
    split_host_port,
)
from shared.runtime.admin_token import default_admin_token_dir
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
from shared.vocabulary import DEFAULT_MAX_MESSAGE_BYTES, PAGE_SIZE

ENV_PREFIX = "BALLOON_HOST"
DEFAULT_HTTP = "127.0.0.1:9470"
MAX_WINDOW = 1 << 16  # what WELCOME may carry (shared/messages.py)
MAX_RANGES = 1 << 24
MAX_GUEST_PAGES = 1 << 52
#: Bytes of a batch message beyond its payload: array header, type, seq (up to 9 bytes),
#: cmd_id for HINT, bin header. Used to check max_ranges fits in max_message_bytes.
BATCH_OVERHEAD = 32
#: The most RAM an open-mode (not provisioned) guest may claim: it sizes its tracker and
#: its RAM file, so it bounds what one unauthenticated HELLO may cost the host.
DEFAULT_MAX_GUEST_MEMORY = 16 << 30


class SettingsError(ValueError):
    """A setting is unusable; the message names the option."""


@dataclass(frozen=True, slots=True)
class HostSettings:
    listen: tuple[Address, ...]
    http: tuple[str, int] | None = ("127.0.0.1", 9470)
    window: int = 16
    max_ranges: int = 4096
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_guests: int = 1024
    backlog: int = 1024
    max_handshakes: int = 1024
    max_handshakes_per_peer: int = 512
    handshake_timeout: float = 5.0
    idle_timeout: float = 60.0
    retention: float = 60.0
    forget_after: float = 10.0
    guests: Path | None = None
    max_guest_memory: int = DEFAULT_MAX_GUEST_MEMORY
    allow_open_tcp: bool = False
    token_file: Path | None = None
    admin_token_file: Path | None = None
    #: where the generated admin token is written (admin-PORT.token) when there is no
    #: admin_token_file; None keeps it in memory only (HostServer.admin_token: embedders, tests)
    admin_token_dir: Path | None = None
    ram_dir: Path | None = None
    vm_ram_dirs: tuple[Path, ...] = ()
    debug_apply_delay: float = 0.0
    policy: str = "manual"
    policy_interval: float | None = None  # None: the policy config's (5 s)
    policy_config: Path | None = None
    guest_memory_budget: int | None = None
    host_memory: str | None = None
    log_format: str = "text"
    log_level: str = "info"

    def __post_init__(self) -> None:
        check(self)


def check(s: HostSettings) -> None:
    """Raise SettingsError for the first unusable value."""
    if not s.listen:
        raise SettingsError("--listen: give at least one address (unix:/path, tcp:HOST:PORT or vsock:CID:PORT)")
    paths = [a.path for a in s.listen if a.kind == "unix"]
    if len(paths) != len(set(paths)):
        raise SettingsError("--listen: the same unix socket path is given twice")
    if not 1 <= s.window <= MAX_WINDOW:
        raise SettingsError(f"--window must be 1..{MAX_WINDOW}, got {s.window}")
    if not 1 <= s.max_ranges <= MAX_RANGES:
        raise SettingsError(f"--max-ranges must be 1..{MAX_RANGES}, got {s.max_ranges}")
    if s.max_message_bytes < 1024:
        raise SettingsError(f"--max-message-bytes must be at least 1KiB, got {format_size(s.max_message_bytes)}")
    # An escaped range takes two words, so a full batch may need 2 * max_ranges words.
    need = 16 * s.max_ranges + BATCH_OVERHEAD
    if need > s.max_message_bytes:
        raise SettingsError(
            f"--max-ranges {s.max_ranges} needs --max-message-bytes >= {format_size(need)} ({need} bytes: "
            f"two 8-byte words per escaped range), got {format_size(s.max_message_bytes)}")
    if s.max_guests < 0:
        raise SettingsError(f"--max-guests cannot be negative, got {s.max_guests}")
    if not PAGE_SIZE <= s.max_guest_memory <= MAX_GUEST_PAGES * PAGE_SIZE:
        raise SettingsError(f"--max-guest-memory must be 4KiB..{format_size(MAX_GUEST_PAGES * PAGE_SIZE)}, "
                            f"got {format_size(s.max_guest_memory)}")
    for name, value in (("--backlog", s.backlog), ("--max-handshakes", s.max_handshakes),
                        ("--max-handshakes-per-peer", s.max_handshakes_per_peer)):
        if not 1 <= value <= 1 << 20:
            raise SettingsError(f"{name} must be 1..{1 << 20}, got {value}")
    for name, value in (("--handshake-timeout", s.handshake_timeout), ("--idle-timeout", s.idle_timeout)):
        if value <= 0:
            raise SettingsError(f"{name} must be positive, got {value}")
    if s.retention < 0:
        raise SettingsError(f"--retention cannot be negative, got {s.retention}")
    if s.forget_after < 0:
        raise SettingsError(f"--forget-after cannot be negative, got {s.forget_after}")
    if s.debug_apply_delay < 0 or s.debug_apply_delay > 60:
        raise SettingsError(f"--debug-apply-delay must be 0..60 seconds, got {s.debug_apply_delay}")
    for name, path in (("--token-file", s.token_file), ("--admin-token-file", s.admin_token_file),
                       ("--guests", s.guests)):
        if path is not None and not Path(path).is_file():
            raise SettingsError(f"{name}: {path} is not a readable file")
    if s.admin_token_dir is not None and not Path(s.admin_token_dir).is_absolute():
        raise SettingsError(f"--admin-token-dir must be an absolute path, got {s.admin_token_dir}")
    for directory in s.vm_ram_dirs:
        if not Path(directory).is_absolute():
            raise SettingsError(f"--vm-ram-dirs: {directory} must be an absolute path")
        if not Path(directory).is_dir():
            raise SettingsError(f"--vm-ram-dirs: {directory} is not an existing directory")
    if s.ram_dir is not None:
        ram_dir = Path(s.ram_dir)
        if ram_dir.exists() and not ram_dir.is_dir():
            raise SettingsError(f"--ram-dir: {ram_dir} exists and is not a directory")
        if not ram_dir.is_absolute():
            raise SettingsError(f"--ram-dir must be an absolute path (the guest maps it), got {ram_dir}")
    if s.log_format not in ("text", "json"):
        raise SettingsError(f"--log-format must be text or json, got {s.log_format!r}")
    policy_settings(s)  # a bad policy knob or host memory source fails here, before anything listens
    if s.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise SettingsError(f"--log-level must be debug, info, warning or error, got {s.log_level!r}")


def policy_settings(s: HostSettings):
    """(PolicyConfig, HostMemorySource) from the flags and ``--policy-config``; SettingsError if unusable."""
    from shared.runtime.config import ConfigFileError, load_config_table

    from .hostmem import HostMemoryError, make_source
    from .policy import PolicyConfig, PolicyConfigError

    try:
        config = PolicyConfig()
        if s.policy_config is not None:
            config = config.with_table(load_config_table(s.policy_config, "policy"))
        overrides = {"policy": s.policy} if s.policy != "manual" or s.policy_config is None else {}
        if s.policy_interval is not None:
            overrides["interval"] = s.policy_interval
        config = config.with_table(overrides)
        source = make_source(s.host_memory, s.guest_memory_budget)
    except ConfigFileError as error:
        raise SettingsError(str(error).replace("--config", "--policy-config")) from None
    except (PolicyConfigError, HostMemoryError) as error:
        raise SettingsError(f"policy: {error}") from None
    return config, source


def _default_token_dir() -> Path:
    return default_admin_token_dir()


def _http(text: str) -> tuple[str, int] | None:
    if text.strip().lower() in ("off", "none", ""):
        return None
    try:
        return split_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_address = argument_type(parse_address, "address")
_size = argument_type(parse_size, "size")
_duration = argument_type(parse_duration, "duration")


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="balloon-host",
        description="The hypervisor side of the balloon channel: serves many guests, validates every "
                    "range they report, tracks reclaimable memory per guest, gives it back to the kernel "
                    "when guest RAM is a shared file, and exposes metrics and an admin API. "
                    "A guest id that has a live session cannot be taken by another connection "
                    "(ERROR guest-busy); guest ids are the labels of every per-guest metric.",
        epilog=describe_layers(ENV_PREFIX),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--listen", action="append", type=_address, default=[], metavar="ADDR",
        help="where guests connect; repeatable. unix:/path (socket created mode 0660, a stale socket "
             "file is replaced, any other file is refused), tcp:HOST:PORT, vsock:CID:PORT "
             f"(vsock forces the stock asyncio loop). Default: {default_address()} (root: "
             f"{ROOT_SOCKET_PATH}; others $XDG_RUNTIME_DIR/balloon/host.sock or /tmp/balloon-UID/host.sock), "
             "the same default as balloon-guest --connect and balloon-load --connect")
    add("--http", type=_http, default=DEFAULT_HTTP, metavar="HOST:PORT",
        help="address of /metrics, /healthz, /readyz and the admin API /api/v1/...; 'off' disables it")
    add("--window", type=_positive_int, default=16,
        help="batches a guest may have unacknowledged at once (the virtqueue size), sent in WELCOME")
    add("--max-ranges", type=_positive_int, default=4096,
        help="most ranges in one batch, sent in WELCOME; a bigger batch is a protocol error")
    add("--max-message-bytes", type=_size, default="1MiB", metavar="SIZE",
        help="largest message accepted; checked from the msgpack header before anything is buffered")
    add("--guests", type=Path, default=None, metavar="FILE",
        help="the inventory (TOML, [guest.ID] tables with memory, listen, ram_file, token, uid, "
             "min_memory, max_memory): provisioned guests whose id, size and RAM file are the host's. "
             "A provisioned id is admitted only on its own listener, with its token or its uid; "
             "a HELLO claiming more pages than provisioned gets ERROR bad-size. See docs/OPERATIONS.md")
    add("--max-guests", type=_positive_int, default=1024,
        help="most open-mode guests (ids not in --guests) known at once, connected or retained; a new one "
             "beyond it gets ERROR too-many-guests. Provisioned guests never count. 0: provisioned guests only")
    add("--max-guest-memory", type=_size, default="16GiB", metavar="SIZE",
        help="most RAM an open-mode guest may claim in HELLO (ERROR bad-size beyond); sizes its tracker "
             "and its RAM file")
    add("--allow-open-tcp", action="store_true", default=False,
        help="admit open-mode guests on TCP listeners without a token (anyone who reaches the port may "
             "then claim any unprovisioned id: demos and load tests only; a warning is logged at start)")
    add("--backlog", type=_positive_int, default=1024,
        help="listen() backlog of every listener: connections the kernel queues before the host "
             "accepts them (a herd of guests reconnecting after a restart); capped by net.core.somaxconn")
    add("--max-handshakes", type=_positive_int, default=1024,
        help="most connections that have not sent HELLO yet, in total; one more gets ERROR "
             "too-many-connections and is closed (each is also closed by --handshake-timeout)")
    add("--max-handshakes-per-peer", type=_positive_int, default=512,
        help="the same, per peer: per uid on unix sockets (SO_PEERCRED), per address on TCP, "
             "per CID on vsock, so one peer's flood cannot lock the others out")
    add("--handshake-timeout", type=_duration, default="5s", metavar="DURATION",
        help="a connection that has not sent a valid HELLO by then gets ERROR handshake-timeout")
    add("--idle-timeout", type=_duration, default="60s", metavar="DURATION",
        help="the host PINGs a guest that sent no whole message for a third of this and closes it "
             "(ERROR idle-timeout) when no whole message arrived for this long (bytes of an "
             "unfinished message do not count)")
    add("--retention", type=_duration, default="60s", metavar="DURATION",
        help="how long a disconnected open-mode guest is remembered (metrics, RAM file) before it is "
             "forgotten; provisioned guests are remembered while provisioned")
    add("--forget-after", type=_duration, default="10s", metavar="DURATION",
        help="an open-mode guest whose session ended with BYE, or applied no batch, is forgotten this "
             "soon (at most --retention), so throwaway ids do not hold --max-guests")
    add("--token-file", type=Path, default=None, metavar="FILE",
        help="secrets for open-mode (unprovisioned) guests, one 'guest-id token' per line: a listed guest "
             "must send its token in HELLO on any transport; on TCP an unlisted, unprovisioned guest is "
             "refused unless --allow-open-tcp (ERROR auth-failed). Provisioned guests keep their token "
             "in --guests")
    add("--admin-token-file", type=Path, default=None, metavar="FILE",
        help="the admin token (its first non-comment line, 8+ characters) that every admin call "
             "changing something (POST, PUT, DELETE) must send as 'Authorization: Bearer TOKEN'; "
             "reads (GET) need none. Without it the host generates a new token at every start "
             "into --admin-token-dir (admin calls are never open)")
    add("--admin-token-dir", type=Path, default=str(_default_token_dir()), metavar="DIR",
        help="where a host without --admin-token-file writes its generated token, as "
             "DIR/admin-PORT.token (PORT: the --http port; mode 0600, removed at stop), for "
             "balloonctl to find by itself. DIR must be writable by the host's user only. It defaults "
             f"to the default socket's directory: {os.path.dirname(ROOT_SOCKET_PATH)} as root, else "
             "$XDG_RUNTIME_DIR/balloon or /tmp/balloon-UID")
    add("--ram-dir", type=Path, default=None, metavar="DIR",
        help="directory (a tmpfs such as /dev/shm/balloon) for shared guest RAM files DIR/<guest>.ram; "
             "guests offering the shared-ram feature get one, and reported/inflated ranges are "
             "punched out of it for real. A provisioned ram_file may also lie here (named <id>.ram)")
    add("--vm-ram-dirs", action="append", type=Path, default=[], metavar="DIR",
        help="directories where provisioned guests' RAM files (the inventory's ram_file, e.g. QEMU's "
             "mem-path) may be; repeatable (comma-separated in the environment). The host punches "
             "no other file: a ram_file must lie under one of these or --ram-dir, be reached "
             "through no symlink, be a regular file with one link, and belong to the host's user "
             "or the directory's owner; anything else is refused (admin API 400, --guests exit 2)")
    add("--debug-apply-delay", type=_duration, default="0", metavar="DURATION",
        help="testing only: play a slow host: each batch's ACK leaves this much later; a batch "
             "that punches the RAM file waits in the worker pool before its punch (a slow fallocate)")
    add("--policy", choices=("manual", "mom", "balance"), default="manual",
        help="automatic balloon sizing: manual (targets only from the admin API), mom (oVirt MOM's "
             "bands) or balance (ChromeOS's balance of guest and host headroom); every policy keeps "
             "the same safety rails (docs/OPERATIONS.md, Policy)")
    add("--policy-interval", type=_duration, default=None, metavar="DURATION",
        help="time between policy ticks (default 5s, or interval in --policy-config)")
    add("--policy-config", type=Path, default=None, metavar="FILE",
        help="TOML file with the policy's knobs (keys at top level or in a [policy] table; "
             "docs/OPERATIONS.md lists them with their defaults)")
    add("--guest-memory-budget", type=_size, default=None, metavar="SIZE",
        help="host memory the guests may hold: the sum of their RAM files' resident bytes (st_blocks) "
             "is kept under it; implies --host-memory budget; changeable at runtime with POST /api/v1/policy")
    add("--host-memory", default=None, metavar="SOURCE",
        help="where the policy reads host memory: meminfo (/proc/meminfo MemAvailable + PSI), "
             "cgroup:/sys/fs/cgroup/DIR (memory.current/max/pressure) or budget; default budget "
             "with --guest-memory-budget, else meminfo")
    add_common_options(parser, "host")
    return parser


def parse_settings(argv, environ=None) -> HostSettings:
    """argv + environment + config file → HostSettings; argparse exits 2 on bad syntax,
    SettingsError carries semantic problems (cli.main turns it into exit 2)."""
    environ = os.environ if environ is None else environ
    try:
        ns = layered_settings(build_parser(), argv, ENV_PREFIX, environ, "host")
    except ConfigFileError as error:
        raise SettingsError(str(error)) from None
    http = ns.http
    if isinstance(http, str):  # default string not run through type by resolve_settings
        http = _http(http)
    return HostSettings(
        listen=tuple(ns.listen) or (parse_address(default_address()),),
        http=http,
        window=ns.window,
        max_ranges=ns.max_ranges,
        max_message_bytes=ns.max_message_bytes,
        max_guests=ns.max_guests,
        backlog=ns.backlog,
        max_handshakes=ns.max_handshakes,
        max_handshakes_per_peer=ns.max_handshakes_per_peer,
        handshake_timeout=ns.handshake_timeout,
        idle_timeout=ns.idle_timeout,
        retention=ns.retention,
        forget_after=ns.forget_after,
        guests=ns.guests,
        max_guest_memory=ns.max_guest_memory,
        allow_open_tcp=ns.allow_open_tcp,
        token_file=ns.token_file,
        admin_token_file=ns.admin_token_file,
        admin_token_dir=ns.admin_token_dir if ns.admin_token_dir is not None else _default_token_dir(),
        ram_dir=ns.ram_dir,
        vm_ram_dirs=tuple(ns.vm_ram_dirs),
        debug_apply_delay=ns.debug_apply_delay,
        policy=ns.policy,
        policy_interval=ns.policy_interval,
        policy_config=ns.policy_config,
        guest_memory_budget=ns.guest_memory_budget,
        host_memory=ns.host_memory,
        log_format=ns.log_format,
        log_level=ns.log_level,
    )
