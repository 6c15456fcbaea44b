"""``balloon-host`` / ``python -m host_daemon``: parse settings, pick the loop, serve until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys

from shared.runtime.addresses import default_socket_path
from shared.runtime.logfmt import configure_logging

from .settings import SettingsError, parse_settings

log = logging.getLogger("balloon.host")


async def serve(settings) -> int:
    import asyncio

    from .listeners import ListenError
    from .server import HostServer  # loaded after parsing: --help stays light

    server = HostServer(settings)
    try:
        await server.start()
    except ListenError as error:
        log.error("cannot listen", extra={"error": str(error)})
        print(f"balloon-host: {error}", file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    await server.wait_stopped()
    return 0


def make_default_socket_dir(listen) -> None:
    """The default socket's directory is ours to make (mode 0750, like systemd's RuntimeDirectory);
    a directory named explicitly in --listen must already exist."""
    default = default_socket_path()
    for address in listen:
        if address.kind == "unix" and address.path == default:
            os.makedirs(os.path.dirname(default), mode=0o750, exist_ok=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = parse_settings(argv)
    except SettingsError as error:
        print(f"balloon-host: error: {error}", file=sys.stderr)
        return 2
    from shared.runtime.admin_token import TokenFileError, load_admin_token

    from .auth import load_guest_tokens
    from .inventory import InventoryError
    from .server import load_inventory

    try:  # token files and the inventory are read before anything listens: a typo fails fast
        tokens = load_guest_tokens(settings.token_file) if settings.token_file else None
        if settings.admin_token_file:
            load_admin_token(settings.admin_token_file)
        load_inventory(settings, tokens)
    except (TokenFileError, InventoryError) as error:
        print(f"balloon-host: error: {error}", file=sys.stderr)
        return 2
    try:
        make_default_socket_dir(settings.listen)
    except OSError as error:
        print(f"balloon-host: error: cannot create {error.filename}: {error.strerror} "
              f"(give --listen unix:PATH somewhere writable)", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    from . import loops
    from .malloc import pin_mmap_threshold

    pin_mmap_threshold()  # a forgotten guest's memory goes back at once (host_daemon/malloc.py)

    name = loops.loop_name(settings.listen)
    log.info("starting", extra={"loop": name})
    return loops.run(serve(settings), name)


if __name__ == "__main__":
    sys.exit(main())
