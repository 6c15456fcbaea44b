"""The seed's measurement on a real kernel: QEMU's own balloon vs. the agent, in real guests.

Every case boots its own TCG guest (tests/vm: Debian's kernel, RAM in a shared /dev/shm
file, the host daemon with the VM provisioned, this checkout's agent inside over
virtio-serial), one after the other in one run, so the figures are side by side:

1. **Inflate** 7/8 of the guest — the cover letters' 7 GiB of 8 GiB — with
   (a) QEMU's virtio-balloon driven through the host (the guest runs no agent: the host's
   target goes out as QMP ``balloon``; the guest's virtio_balloon driver sends legacy 256-PFN
   arrays and QEMU discards each page), (b) the agent in ``ranges52``, (c) the agent in
   ``pfn32``. The host learns each guest's RAM layout over QMP (an 8 GiB ``pc`` guest has RAM
   above the PCI hole). The guest's RAM is written full before boot (every page backed, as in
   a guest that has used all its memory), so the RAM file's st_blocks drop is exactly what
   came back. For the agent: where its time went — faulting/zeroing/pinning pages, reading
   pagemap, the host applying batches (punching) — and the rest (channel, event loops).
   TCG makes the guest's page faults and zeroing ~50x slower than on KVM, so each row also
   gives its time less what the guest spent faulting in and zeroing the balloon's pages —
   the agent measures exactly that for exactly those pages (``pin_s``: fault, zero, mlock);
   QEMU's driver takes pages without touching them (``init_on_alloc=0``): 0 — the part that
   carries over to KVM.
2. **Free page reporting** after a large free: the guest touches then frees a block of
   memory; time until 50 % and 90 % of it is gone from the RAM file, (d) with QEMU's
   ``free-page-reporting=on`` (the kernel's mm/page_reporting.c) and (e) with the agent's
   reporting by allocation.
3. **Footprint**: the agent's RSS and CPU in the guest while idle and while reporting.

Needs root (apt, kernel package, mlock in the guest). ``--guest-mib`` (default 8192, the
seed's case); ``--free-mib`` for part 2. Prints a markdown section for docs/PERFORMANCE.md
("Real VM").
"""

from __future__ import annotations

import argparse
import json
import re
import time

from bench.common import machine_line
from tests.vm.stack import Stack, poll

MIB = 1 << 20


def _agent_seconds(log: str) -> dict:
    """The agent's own timing line ("balloon at target ... pin_s=... pagemap_s=...")."""
    found = {}
    for line in log.splitlines():
        if "balloon at target" in line:
            found = {k: float(v) for k, v in re.findall(r"(\w+_s)=([0-9.]+)", line)}
    return found


def _apply_seconds(stack: Stack) -> float:
    """Host-wide sum of balloon_batch_apply_seconds (tracker + punching)."""
    import urllib.request

    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("balloon_batch_apply_seconds_sum"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _guest_view(stack: Stack, predicate, timeout: float, what: str) -> dict:
    return poll(lambda: (lambda r: r if predicate(r) else None)(stack.guest()), timeout, what, interval=0.05)


def inflate_qemu(guest_mib: int, balloon_mib: int) -> dict:
    """QEMU's own balloon, driven by the host through QMP (a stock guest: no agent)."""
    with Stack(memory_mib=guest_mib, prealloc=False, zero_fill=True, qemu_balloon=True, host_qmp=True,
               hostroot=False) as stack:
        vm = stack.vm
        _guest_view(stack, lambda r: r["driver"] == "virtio-balloon" and r["vmm"]["state"] == "connected",
                    120, "the host's QMP link to a stock guest")
        before = vm.ram_allocated()
        t0 = time.perf_counter()
        stack.target(balloon_mib)
        _guest_view(stack, lambda r: r["inflated_bytes"] >= balloon_mib * MIB, 1200, "QEMU balloon through the host")
        seconds = time.perf_counter() - t0
        returned = before - vm.ram_allocated()
        t1 = time.perf_counter()
        stack.target(0)
        _guest_view(stack, lambda r: r["inflated_bytes"] == 0, 1200, "QEMU deflate through the host")
        return {"mode": "QEMU virtio-balloon through the host's QMP (legacy 256-PFN arrays)", "seconds": seconds,
                "returned": returned, "deflate_seconds": time.perf_counter() - t1, "boot": vm.boot_seconds,
                "zeroed": 0}


def inflate_agent(guest_mib: int, balloon_mib: int, pfn32: bool) -> dict:
    with Stack(memory_mib=guest_mib, prealloc=False, zero_fill=True, host_qmp=True) as stack:
        vm = stack.vm
        stack.start_agent("--source linux", "--no-reporting", *(["--pfn32"] if pfn32 else []))
        stack.wait_connected(300)
        before, applied = vm.ram_allocated(), _apply_seconds(stack)
        t0 = time.perf_counter()
        stack.target(balloon_mib)
        record = stack.wait_inflated(balloon_mib, 1200)
        seconds = time.perf_counter() - t0
        returned = before - vm.ram_allocated()
        parts = _agent_seconds(vm.run("grep 'balloon at target' /tmp/agent.log", check=False))
        apply = _apply_seconds(stack) - applied
        t1 = time.perf_counter()
        stack.target(0)
        stack.wait_inflated(0, 1200)
        return {"mode": f"agent, {'pfn32' if pfn32 else 'ranges52'}", "seconds": seconds, "returned": returned,
                "deflate_seconds": time.perf_counter() - t1, "batches": record["batches"]["inflate"],
                "pin": parts.get("pin_s"), "pagemap": parts.get("pagemap_s"), "apply": apply,
                "boot": vm.boot_seconds, "zeroed": parts.get("pin_s")}


def _rss_cpu(stack: Stack, pid: int, seconds: float) -> tuple[float, float]:
    """(VmRSS MiB, CPU %) of a guest process over ``seconds``. VmRSS includes the pages it
    pins for the host (VmLck can't be subtracted: the per-task RSS counter lags mlock), so
    the idle figure is taken with nothing pinned."""
    vm = stack.vm

    def sample():
        out = vm.run(f"cat /proc/{pid}/stat; grep -E 'VmRSS' /proc/{pid}/status; cut -d' ' -f1 /proc/uptime")
        stat, rss, uptime = out.strip().splitlines()[-3:]
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        assert rss.startswith("VmRSS:"), rss  # status lists VmLck before VmRSS: read it by name
        return ticks, int(rss.split()[1]) / 1024, float(uptime)

    t_a, rss_a, up_a = sample()
    time.sleep(seconds)
    t_b, rss_b, up_b = sample()
    return max(rss_a, rss_b), 100.0 * (t_b - t_a) / 100.0 / max(1e-9, up_b - up_a)  # USER_HZ = 100


def _drain(stack: Stack, free_mib: int, quiet, during=None) -> dict:
    """Touch ``free_mib`` in the guest, free it, time the RAM file's drop to 50 % and 90 %."""
    vm = stack.vm
    quiet()
    base = vm.ram_allocated()
    vm.run(vm.python(f"{vm.repo}/tests/vm/guest_memcheck.py check {free_mib}"), 600)
    t0 = time.perf_counter()  # the process has exited: its memory is free in the guest
    peak = vm.ram_allocated()
    grown = peak - base
    marks: dict[float, float] = {}
    if during is not None:
        during()  # sampled while the memory drains
    deadline = t0 + 300
    while time.perf_counter() < deadline and len(marks) < 2:
        gone = peak - vm.ram_allocated()
        for share in (0.5, 0.9):
            if share not in marks and gone >= share * grown:
                marks[share] = time.perf_counter() - t0
        time.sleep(0.1)
    return {"grown": grown, "t50": marks.get(0.5), "t90": marks.get(0.9), "final": peak - vm.ram_allocated()}


def reporting_qemu(guest_mib: int, free_mib: int) -> dict:
    with Stack(memory_mib=guest_mib, prealloc=False, free_page_reporting=True, host_qmp=True) as stack:
        def quiet():  # let the kernel finish reporting what was free at boot
            time.sleep(6)
        result = _drain(stack, free_mib, quiet)
        result["mode"] = "QEMU free-page-reporting=on (mm/page_reporting.c)"
        return result


def reporting_agent(guest_mib: int, free_mib: int) -> dict:
    with Stack(memory_mib=guest_mib, prealloc=False, host_qmp=True) as stack:  # the layout, for any size
        stack.start_agent("--source linux")
        stack.wait_connected(300)
        pid = stack.agent_pids()[0]

        def quiet():  # the session's first pass reports (and first touches) everything free
            def settled():
                return stack.guest()["reported_pages"] > 0 and stack.vm.meminfo()["Mlocked"] < 4 * MIB
            poll(settled, 600, "the first reporting pass to finish", interval=2.0)
            time.sleep(3.0)
            return settled()

        assert quiet(), "reporting did not stay quiet"
        idle = _rss_cpu(stack, pid, 10.0)
        busy: list = []
        result = _drain(stack, free_mib, quiet=lambda: None, during=lambda: busy.append(_rss_cpu(stack, pid, 3.0)))
        result["mode"] = "agent, reporting by allocation"
        result["idle"] = idle
        result["busy"] = busy[0] if busy else None
        return result


def fmt(value, unit="", digits=1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}{unit}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guest-mib", type=int, default=8192)
    parser.add_argument("--balloon-mib", type=int, default=None, help="default: 7/8 of the guest")
    parser.add_argument("--free-mib", type=int, default=1536)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=("inflate", "reporting"), default=None)
    parser.add_argument("--quick", action="store_true",
                        help="one 1 GiB guest, QEMU's balloon only (checks the bench still runs)")
    args = parser.parse_args(argv)
    from tests.vm import harness

    if (reason := harness.missing()) is not None:
        print(f"bench.vm skipped: {reason}")
        return 0
    if args.quick:  # a 1 GiB guest cannot give 7/8 of itself: its kernel needs ~100 MiB
        args.guest_mib, args.balloon_mib, args.only = 1024, args.balloon_mib or 512, "quick"
    balloon = args.balloon_mib or args.guest_mib * 7 // 8
    inflates: list = []
    reports: list = []
    if args.only == "quick":
        inflates = [inflate_qemu(args.guest_mib, balloon)]
    elif args.only != "reporting":
        inflates = [inflate_qemu(args.guest_mib, balloon), inflate_agent(args.guest_mib, balloon, False),
                    inflate_agent(args.guest_mib, balloon, True)]
    if args.only not in ("inflate", "quick"):
        reports = [reporting_qemu(args.guest_mib, args.free_mib), reporting_agent(args.guest_mib, args.free_mib)]
    busy = reports[1]["busy"] if reports else None
    if args.json:
        print(json.dumps({"inflate": inflates, "reporting": reports, "busy": busy}, default=str, indent=1))
        return 0
    only = f" --only {args.only}" if args.only in ("inflate", "reporting") else ""
    lines = [f"Measured {machine_line()} with `python -m bench.vm --guest-mib {args.guest_mib} "
             f"--free-mib {args.free_mib}{only}` (root)", "",
             f"Guest {args.guest_mib} MiB (`pc`, TCG, 1 vCPU, `init_on_alloc=0`, RAM written full in /dev/shm "
             f"before boot, layout over QMP), balloon {balloon} MiB ({balloon * 256} pages); one fresh guest per "
             "row, one after the other. *less zeroing*: wall time minus what the guest spent faulting in and "
             "zeroing the balloon's pages (the agent's pin time for exactly those pages; QEMU's driver takes "
             "pages untouched: 0). TCG inflates that part ~50x, KVM does not.", "",
             "| inflate with | wall s | less zeroing s | host memory returned (st_blocks) | batches "
             "| pin (fault+zero+mlock) s | pagemap s | host apply (punch) s | rest (channel, loops) s | deflate s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in inflates:
        rest = None
        if r.get("pin") is not None:
            rest = max(0.0, r["seconds"] - r["pin"] - r["pagemap"] - r["apply"])
        less = None if r["zeroed"] is None else r["seconds"] - r["zeroed"]
        lines.append(f"| {r['mode']} | {fmt(r['seconds'])} | {fmt(less)} | "
                     f"{r['returned'] / MIB:,.1f} MiB | "
                     f"{r.get('batches', '—')} | {fmt(r.get('pin'))} | {fmt(r.get('pagemap'), digits=2)} | "
                     f"{fmt(r.get('apply'), digits=2)} | {fmt(rest)} | {fmt(r['deflate_seconds'])} |")
    lines += ["", f"Free page reporting after the guest touched and freed {args.free_mib} MiB "
              "(RAM not preallocated; time from the freeing process's exit):", "",
              "| reporting by | file grew by | 50 % returned after | 90 % returned after | returned in the end |",
              "|---|---:|---:|---:|---:|"]
    for r in reports:
        lines.append(f"| {r['mode']} | {r['grown'] / MIB:,.0f} MiB | {fmt(r['t50'], ' s')} | {fmt(r['t90'], ' s')} "
                     f"| {r['final'] / MIB:,.0f} MiB |")
    if reports:
        idle = reports[1]["idle"]
        lines += ["", "The agent's footprint in the guest (VmRSS, which includes pages it pins for the host; "
                  "CPU = utime+stime over guest uptime):", "",
                  "| agent | RSS | CPU |", "|---|---:|---:|",
                  f"| idle, connected, balloon empty | {idle[0]:.1f} MiB | {idle[1]:.1f} % |"]
        if busy:
            lines.append(f"| reporting a {args.free_mib} MiB free | {busy[0]:.1f} MiB | {busy[1]:.1f} % |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
