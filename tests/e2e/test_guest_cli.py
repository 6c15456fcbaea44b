"""balloon-guest as a newcomer starts it: refused for good, side by side, and a host's clean stop."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from daemons import Daemons, wait_for


def _guest_argv(d: Daemons, guest_id: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "guest_agent", "--connect", f"unix:{d.socket}", "--id", guest_id,
            "--reconnect-max", "200ms", *extra]


def test_a_guest_the_host_refuses_for_good_exits_2_with_one_line():
    d = Daemons()
    try:
        host = d.host("--max-guest-memory", "64MiB")
        done = subprocess.run(_guest_argv(d, "big", "--memory", "256MiB", "--http", "off", "--log-level", "warning"),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines == ["balloon-guest: error: the host refuses guest big (bad-size): it allows at most 64MiB "
                         "for an unprovisioned guest (its --max-guest-memory) and this guest has 256MiB "
                         "(--memory); not retrying"], done.stderr
        wait_for(lambda: re.search(r"session end.*guest=big.*reason=bad-size", host.log.read_text()), 10,
                 "the host's log naming the refused guest by its claimed id")
        assert "guest=None" not in host.log.read_text()
    finally:
        d.close()


def test_two_guests_with_default_options_run_side_by_side():
    """No --http: each guest takes the first free port from 9471 and says which."""
    d = Daemons()
    guests = []
    try:
        for name in ("a", "b"):
            log = d.folder / f"{name}.log"
            with open(log, "wb") as out:
                guests.append((log, subprocess.Popen(_guest_argv(d, name, "--memory", "64MiB"), stdout=out,
                                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)))

        def urls():
            for log, popen in guests:
                assert popen.poll() is None, log.read_text()
            found = [re.search(r"url=(http://127\.0\.0\.1:(\d+)/metrics)", log.read_text()) for log, _ in guests]
            return all(found) and [m.group(1) for m in found]

        first, second = wait_for(urls, 20, "both guests serving metrics")
        assert first != second
        assert all(int(url.rsplit(":", 1)[1].split("/")[0]) >= 9471 for url in (first, second))
    finally:
        for _, popen in guests:
            popen.kill()
            popen.wait(10)
        d.close()


def test_a_clean_host_stop_is_no_warning_in_the_guest():
    d = Daemons()
    try:
        host = d.host()
        guest = d.guest("g1", "--memory", "64MiB")
        wait_for(lambda: "session started" in guest.log.read_text(), 20, "a session")
        host.kill(signal.SIGTERM)
        host.popen.wait(20)
        wait_for(lambda: "no session" in guest.log.read_text(), 20, "the guest's first reconnect attempt")
        text = guest.log.read_text()
        assert "the host ended the session" in text
        assert "WARNING" not in text, text
    finally:
        d.close()
