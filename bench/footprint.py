"""The guest agent's footprint on this machine: what it imports, its idle RSS and CPU.

The agent runs inside the guest whose memory it reclaims, so its own size and wakeups are
part of the product (issue 19: at most 40 MiB RSS idle, at most 2 % of a TCG vCPU). Measured:

1. **Imports**: ``balloon-guest``'s module graph in a fresh interpreter (guest_agent/entry.py's
   OpenSSL block, then ``guest_agent.cli``): its ``-X importtime`` total and the VmRSS after it.
2. **Idle**: a real ``balloon-host`` and a ``balloon-guest --memory 1GiB --http 127.0.0.1:0``
   (simulated source, idle workload); once its first reporting pass is acknowledged and
   nothing is in flight, VmRSS and utime+stime over a window (``--seconds``), with a scrape
   of its /metrics at the start.

The CPU here is a share of one host core; a TCG vCPU is tens of times slower, which is what
``python -m bench.vm --only reporting`` measures in a real guest (root, docs/PERFORMANCE.md
"Real VM").

    python -m bench.footprint [--seconds 30] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import claim, machine_line

ROOT = Path(__file__).resolve().parents[1]
RSS_TARGET_MIB = 40.0
IMPORTS = """
import sys, re
for name in sys.argv[1:]:  # what guest_agent/entry.py blocks
    sys.modules.setdefault(name, None)
import guest_agent.cli
print(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def _blocked() -> tuple[str, ...]:
    if not (ROOT / "guest_agent" / "entry.py").exists():  # a tree from before it (the "before" figures)
        return ()
    from guest_agent.entry import OPENSSL_MODULES

    return OPENSSL_MODULES


def imports() -> dict:
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS, *_blocked()], capture_output=True, text=True,
                            cwd=ROOT, check=True, timeout=120)
    total = sum(int(line.split("|")[0].split(":")[1]) for line in result.stderr.splitlines()
                if line.startswith("import time:") and line.split("|")[0].split(":")[1].strip().isdigit())
    return {"import_ms": total / 1000, "import_rss_mib": int(result.stdout.split()[-1]) / 1024}


def _sample(pid: int) -> tuple[int, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return int(fields[11]) + int(fields[12]), rss / 1024


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M)}


def idle(seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="balloon-footprint-") as tmp:
        sock, log = f"{tmp}/host.sock", Path(tmp) / "guest.log"
        host = subprocess.Popen([sys.executable, "-m", "host_daemon.cli", "--listen", f"unix:{sock}", "--http", "off",
                                 "--admin-token-dir", tmp], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        guest = None
        try:
            deadline = time.monotonic() + 120
            while not os.path.exists(sock):
                if host.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("balloon-host did not start")
                time.sleep(0.1)
            with open(log, "w") as stderr:
                guest = subprocess.Popen([sys.executable, "-m", "guest_agent", "--connect", f"unix:{sock}",
                                          "--id", "footprint", "--memory", "1GiB", "--http", "127.0.0.1:0"],
                                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
            url = None
            while True:
                if time.monotonic() > deadline or guest.poll() is not None:
                    raise RuntimeError(f"the guest did not settle: {log.read_text()[-400:]}")
                if url is None and (found := re.search(r"url=(http://\S+/metrics)", log.read_text())):
                    url = found.group(1)
                if url is not None:
                    values = _metrics(url)
                    if values.get("balloon_guest_reported_bytes", 0) > 0 and values.get(
                            "balloon_guest_inflight_batches", 1) == 0 and values.get("balloon_guest_isolated_bytes", 1) == 0:
                        break
                time.sleep(0.5)
            time.sleep(2.0)  # the last ACK's follow-ups (stats, logging) settle
            ticks_a, rss_a = _sample(guest.pid)
            t_a = time.monotonic()
            time.sleep(seconds)
            ticks_b, rss_b = _sample(guest.pid)
            t_b = time.monotonic()
            _metrics(url)  # scraped as Prometheus would, then RSS once more
            _, rss_c = _sample(guest.pid)
            hz = os.sysconf("SC_CLK_TCK")
            return {"rss_mib": max(rss_a, rss_b, rss_c), "cpu_percent": 100.0 * (ticks_b - ticks_a) / hz / (t_b - t_a),
                    "seconds": seconds}
        finally:
            for process in (guest, host):
                if process is not None and process.poll() is None:
                    process.terminate()
                    process.wait(10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="idle window for the CPU figure")
    parser.add_argument("--quick", action="store_true", help="a 10 s window")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    seconds = 10.0 if args.quick else args.seconds
    figures = {**imports(), **idle(seconds)}
    if args.json or not args.markdown:
        print(json.dumps(figures))
        return 0
    met = figures["rss_mib"] <= RSS_TARGET_MIB
    print("\n".join([
        f"Measured {machine_line()} with `python -m bench.footprint --seconds {seconds:g}`: a simulated 1 GiB "
        "guest (`--workload idle`) connected to a real balloon-host, after its first reporting pass.", "",
        "| guest agent | VmRSS | CPU (one host core) | imports |", "|---|---:|---:|---:|",
        f"| `import guest_agent.cli` (as balloon-guest loads it) | {figures['import_rss_mib']:.1f} MiB | — "
        f"| {figures['import_ms']:.0f} ms |",
        f"| idle, connected, {seconds:g} s window | **{figures['rss_mib']:.1f} MiB** | {figures['cpu_percent']:.2f} % | |",
        "", claim("guest agent RSS idle (host, simulated 1 GiB)", f"≤ {RSS_TARGET_MIB:.0f} MiB",
                  f"{figures['rss_mib']:.1f} MiB", met)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
